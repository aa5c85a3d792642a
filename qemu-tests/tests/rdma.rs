//! cio over RDMA between two QEMU guests on a private wire (`-netdev
//! socket` on the host's loopback), soft-RoCE (`rdma_rxe`) in both. Guest A
//! serves its real edu through VFIO (`vedu0`) and the emulated edu and
//! memory device with `ciod-rdma` on `rdma:192.168.77.1:7451`; guest B runs
//! the clients (`cio-rdma`). Both are ciod and cio built with the `rdma`
//! feature.

use std::time::Duration;

use cio_qemu_tests::{free_port, qmp, rig, rig_binary, Guest, TempDir};

const A: &str = "192.168.77.1";
const B: &str = "192.168.77.2";

/// Boots guest A (edu, wire listener, QMP at `qmp_a`) then guest B (wire
/// connector).
fn two_guests(rig: &std::path::Path, qmp_a: &std::path::Path) -> (Guest, Guest) {
    let wire = free_port();
    let listen = format!("socket,id=w0,listen=127.0.0.1:{wire}");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_a.display());
    let mut a = Guest::boot_with(
        rig,
        &[
            "-device",
            "edu",
            "-netdev",
            &listen,
            "-device",
            "virtio-net-pci,netdev=w0,mac=52:54:00:cc:00:01",
            "-qmp",
            &qmp_arg,
        ],
        &format!("cio.rdma=eth1:{A}"),
    );
    a.wait_for("CIO-READY", Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("guest A: {e}"));
    let connect = format!("socket,id=w0,connect=127.0.0.1:{wire}");
    let mut b = Guest::boot_with(
        rig,
        &[
            "-netdev",
            &connect,
            "-device",
            "virtio-net-pci,netdev=w0,mac=52:54:00:cc:00:02",
        ],
        &format!("cio.rdma=eth1:{B}"),
    );
    b.wait_for("CIO-READY", Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("guest B: {e}"));
    // B's clients prove guest A's key.
    let (rc, out) = b
        .run(
            &format!("echo {} > /tmp/psk-a && chmod 600 /tmp/psk-a", a.key),
            Duration::from_secs(20),
        )
        .unwrap();
    assert_eq!(rc, 0, "{out}");
    (a, b)
}

/// `cio-rdma` in guest B with guest A's key and a plaintext link.
const CIO: &str = "cio-rdma --psk-file /tmp/psk-a --insecure-plaintext";

/// Runs `cio-rdma ARGS` in guest B against guest A; returns status and
/// output.
fn cio(b: &mut Guest, args: &str, timeout: Duration) -> (i32, String) {
    b.run(&format!("{CIO} {args}"), timeout)
        .unwrap_or_else(|e| panic!("cio-rdma {args}: {e}"))
}

#[test]
fn edu_and_memory_device_over_soft_roce_between_two_guests() {
    let Some(rig) = rig() else { return };
    let dir = TempDir(std::env::temp_dir().join(format!("cio-rdma-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let qmp_a = dir.0.join("qmp-a");
    let (mut a, mut b) = two_guests(&rig, &qmp_a);
    let ep = format!("rdma:{A}:7451");

    let (rc, out) = cio(&mut b, &format!("list {ep}"), Duration::from_secs(60));
    assert_eq!(rc, 0, "cio list over RDMA:\n{out}");
    for name in ["vedu0", "edu0", "mem0"] {
        assert!(out.contains(name), "{name} listed over RDMA:\n{out}");
    }

    // The real edu (through guest A's VFIO and vIOMMU), the emulated edu
    // and the memory device, each by a client of its own on the RDMA link:
    // edu self-tests (factorials, MSI, DMA both ways) and posted-write
    // bursts read back in order, with DMA both ways; beside them a hostile
    // client sends garbage, cut frames and silence on the same link.
    // Meanwhile rping (rdmacm-utils: an RDMA peer that speaks its own
    // protocol, not cio's) connects to the same listener: its connection
    // ends, nobody else's does.
    let (rc, out) = cio(
        &mut b,
        &format!(
            "soak --backend {ep} --edu vedu0 --edu edu0 --memory mem0 --seconds 20 --every 10 & \
             sleep 5; timeout 20 rping -c -a {A} -p 7451 -C 2 -v; wait $!"
        ),
        Duration::from_secs(120),
    );
    eprintln!("soak over RDMA with rping beside it:\n{out}");
    assert_eq!(rc, 0, "soak over RDMA:\n{out}");
    assert!(out.contains(" 0 errors"), "{out}");
    // (rping exits 0 whatever happened: its words say it was cut off.)
    assert!(
        out.contains("DISCONNECT EVENT") && !out.contains("ping data"),
        "rping was not cut off by ciod:\n{out}"
    );

    // A peer that ignores the credit protocol (qemu-tests/src/bin/
    // rdma-overrun.rs: it returns credits it was never given) beside a
    // client: ciod ends that connection at its first message, the client
    // sees no error. Then once more alone, for ciod's words about it (its
    // connection-end warnings are rate-limited, once a second, and the
    // soak's hostile client keeps them busy).
    let (rc, out) = cio(
        &mut b,
        &format!(
            "soak --backend {ep} --memory mem0 --seconds 10 --every 5 & \
             sleep 3; rdma-overrun {A}:7451 100000; wait $!"
        ),
        Duration::from_secs(90),
    );
    eprintln!("soak over RDMA beside a peer breaking the credit rules:\n{out}");
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains(" 0 errors"), "{out}");
    assert!(
        out.contains("overrun: ") && !out.contains("overrun: not stopped"),
        "{out}"
    );
    let (rc, out) = b
        .run(
            // After the hostile client's last connections (silent ones
            // end at ciod's 10 s handshake timeout).
            &format!("sleep 11; rdma-overrun {A}:7451 1000"),
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(rc, 0, "{out}");
    let (_, log) = a.run("cat /tmp/ciod.log", Duration::from_secs(20)).unwrap();
    assert!(
        log.contains("more than this side ever used"),
        "ciod did not say why it ended the peer breaking the credit rules:\n{out}\n{log}"
    );

    // The link lost under a client: guest A frozen (QMP stop) for 26 s.
    // Guest B's side notices the silence (no frame for four keepalive
    // intervals, 20 s: soft-RoCE's own retries did not fail the queue
    // pairs in these runs), the session (one for the whole soak) resumes on
    // a new RDMA connection once A runs again, and no request fails (the memory device's requests wait
    // up to 30 s; an edu's self-test would give up on its interrupt after
    // 5 s). (Taking B's interface down instead is the same cut with a port
    // event, which 6.1's rdma_rxe does not survive under load: a WARN in
    // rxe_completer, then no connection manager traffic at all.)
    let (rc, out) = b
        .run(
            &format!(
                "RUST_LOG=info {CIO} soak \
                 --backend {ep} --memory mem0 --session-rounds 0 --seconds 55 --every 5 \
                 > /tmp/soak.log 2>&1 & \
                 echo $! > /tmp/soak.pid"
            ),
            Duration::from_secs(20),
        )
        .unwrap();
    assert_eq!(rc, 0, "{out}");
    std::thread::sleep(Duration::from_secs(8));
    qmp(&qmp_a, "stop");
    std::thread::sleep(Duration::from_secs(26));
    qmp(&qmp_a, "cont");
    let (rc, out) = b
        .run(
            "wait $(cat /tmp/soak.pid); echo soak-status=$?; cat /tmp/soak.log",
            Duration::from_secs(120),
        )
        .unwrap();
    eprintln!("soak over RDMA with guest A frozen for 26 s:\n{out}");
    let (_, log) = a.run("cat /tmp/ciod.log", Duration::from_secs(20)).unwrap();
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("soak-status=0") && out.contains(" 0 errors"),
        "soak over RDMA across a cut:\n{out}\nguest A's ciod:\n{log}"
    );
    assert!(
        out.contains("session resumed on a new connection")
            && log.contains("resumed on a new connection"),
        "no session resumed after the cut:\n{out}\nguest A's ciod:\n{log}"
    );

    // Last, with guest A idle: cio bench over RDMA in guest B (its own
    // soft-RoCE device, both ends in the guest) against raw verbs (a
    // SEND/RECV ping-pong for P1, RDMA WRITE bandwidth for P3), the stock
    // raw-verbs ping-pong beside it for a check of that baseline
    // (ibv_rc_pingpong, 8-byte SEND/RECV; -e: sleeping on completion events
    // as cio and its baseline do, not both ends spinning on the guest's one
    // vCPU), and cio bench over TCP in the same guest for comparison.
    // Quick runs (a full one takes minutes under TCG: its P1 rows are in
    // the closing note), for the code paths; printed for the record (the
    // ratios, not the microseconds, mean something under TCG).
    for (what, cmd) in [
        (
            "cio bench over RDMA",
            format!(
                "cio-rdma bench --quick --transport rdma --rdma-addr {B} --only P1,P3 --json /tmp/b.json"
            ),
        ),
        (
            "raw verbs ping-pong",
            "ibv_rc_pingpong -e -d rxe0 -g 1 -s 8 -n 2000 > /tmp/pp.log 2>&1 & sleep 1; \
             ibv_rc_pingpong -e -d rxe0 -g 1 -s 8 -n 2000 127.0.0.1; wait $!; cat /tmp/pp.log"
                .to_string(),
        ),
        (
            "cio bench over TCP",
            "cio-rdma bench --quick --transport tcp --only P1 --json /tmp/t.json".to_string(),
        ),
    ] {
        let start = std::time::Instant::now();
        let (rc, out) = b.run(&cmd, Duration::from_secs(600)).unwrap();
        eprintln!("{what} ({:?}):\n{out}", start.elapsed());
        assert_eq!(rc, 0, "{what}:\n{out}");
        if what == "cio bench over RDMA" {
            for baseline in ["P1  rdma  BAR read 8 B round trip (raw: verbs)", "(raw: WRITE)"] {
                assert!(out.contains(baseline), "no {baseline:?} row:\n{out}");
            }
        }
    }
}

/// This host has the RDMA libraries but no RDMA device: both RDMA binaries
/// fail at once and say what is missing.
#[test]
fn without_an_rdma_device_both_ends_say_what_is_missing() {
    let Some(rig) = rig() else { return };
    let dir = TempDir(std::env::temp_dir().join(format!("cio-rdma-none-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let key = dir.0.join("psk");
    std::fs::write(&key, "a key of thirty-two bytes or more!").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let key = key.to_str().unwrap();
    let link = ["--psk-file", key, "--insecure-plaintext"];
    for (bin, args) in [
        ("cio-rdma", vec!["list", "rdma:127.0.0.1:7451"]),
        (
            "ciod-rdma",
            vec!["--listen", "rdma:127.0.0.1:7451", "--emulate", "edu"],
        ),
    ] {
        let out = std::process::Command::new(rig_binary(&rig, bin))
            .args(link)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bin} {args:?} succeeded:\n{err}");
        assert!(
            err.contains("no usable RDMA device") && err.contains("rdma_rxe"),
            "{bin} {args:?}:\n{err}"
        );
    }
}
