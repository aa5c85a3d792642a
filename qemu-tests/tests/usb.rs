//! USB remoting through the guest kernel's own drivers: a QEMU usb-storage
//! disk on qemu-xhci is exported by ciod through usbip-host and attached
//! back through vhci-hcd, by cio over an authenticated session and by
//! Debian's stock usbip/usbipd in both directions. The scenario runs inside
//! the guest (qemu-tests/guest-usb.sh); this test makes the disk image,
//! boots the guest and checks every result line against what it knows.

use std::io::Write;
use std::time::Duration;

use cio_qemu_tests::{rig, Guest};
use sha2::{Digest, Sha256};

const KNOWN: usize = 4 << 20;
const IMAGE: usize = 32 << 20;

/// The image: a pseudo-random "known file" in its first 4 MiB, zeros after.
fn make_image(path: &std::path::Path) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut known = Vec::with_capacity(KNOWN);
    while known.len() < KNOWN {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        known.extend_from_slice(&x.to_le_bytes());
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&known).unwrap();
    f.set_len(IMAGE as u64).unwrap();
    format!("{:x}", Sha256::digest(&known))
}

fn fields(g: &Guest, prefix: &str) -> Vec<Vec<String>> {
    g.lines_with(&format!("CIO-USB {prefix} "))
        .iter()
        .map(|l| {
            let rest = &l[l.find("CIO-USB").unwrap()..];
            rest.split_whitespace().skip(2).map(str::to_owned).collect()
        })
        .collect()
}

/// MiB/s of each timed read, by path.
fn rates(g: &Guest, path: &str) -> Vec<f64> {
    fields(g, "READ")
        .iter()
        .filter(|f| f[0] == path)
        .map(|f| {
            let mib: f64 = f[1].parse().unwrap();
            let cs: f64 = f[2].parse().unwrap();
            mib * 100.0 / cs.max(1.0)
        })
        .collect()
}

#[test]
fn usb_storage_through_cio_and_stock_usbip_in_both_directions() {
    let Some(rig) = rig() else { return };
    let dir = std::env::temp_dir().join(format!("cio-usb-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    let known = make_image(&img);
    let drive = format!("if=none,id=u,file={},format=raw", img.display());
    let mut g = Guest::boot_with(
        &rig,
        &[
            "-device",
            "qemu-xhci,id=xhci",
            "-drive",
            &drive,
            "-device",
            "usb-storage,bus=xhci.0,drive=u",
        ],
        "cio.test=usb",
    );
    let done = g.wait_for("CIO-USB DONE", Duration::from_secs(900));
    let _ = std::fs::remove_dir_all(&dir);
    done.unwrap();

    let src = &fields(&g, "SRC")[0];
    assert_eq!(
        src[1], "5000",
        "usb-storage on qemu-xhci is SuperSpeed: {src:?}"
    );
    // The known file reads the same on every path.
    let sums = fields(&g, "SUM");
    let paths: Vec<&str> = sums.iter().map(|f| f[0].as_str()).collect();
    assert_eq!(
        paths,
        [
            "local",
            "cio",
            "direct",
            "stock-client",
            "stock-server",
            "reexport"
        ]
    );
    for f in &sums {
        assert_eq!(f[1], known, "checksum of the known file via {}", f[0]);
    }
    // 8 MiB written through cio read back the same (O_DIRECT, uncached).
    let w = &fields(&g, "WRITE")[0];
    assert_eq!(w[1], w[2], "8 MiB read back differs");
    for l in ["cio", "stock-client", "stock-server"] {
        assert!(
            fields(&g, "LIST").iter().any(|f| f[0] == l && f[1] == "ok"),
            "{l} list"
        );
    }
    let port = g.lines_with("CIO-USB PORT ").join(" ");
    assert!(port.contains("cio://") && port.contains(&src[0]), "{port}");
    // The same port as JSON, parsed.
    let line = g.lines_with("CIO-USB PORTJSON").join("");
    let (number, json) = line
        .split_once("PORTJSON ")
        .and_then(|(_, r)| r.split_once(' '))
        .expect("PORTJSON line");
    let v: serde_json::Value = serde_json::from_str(json).expect("cio usb port --json parses");
    let p = &v["ports"][0];
    assert_eq!(p["port"].as_u64(), number.parse().ok(), "{json}");
    assert!(
        p["source"].as_str().is_some_and(|s| s.contains(&src[0])),
        "{json}"
    );
    assert!(
        p["local_busid"].as_str().is_some_and(|b| !b.is_empty()),
        "{json}"
    );
    assert!(
        p["speed_name"]
            .as_str()
            .is_some_and(|n| n.contains("Speed")),
        "{json}"
    );
    // Every kind of end gives the device back to its own driver.
    let restored: Vec<String> = fields(&g, "RESTORED")
        .iter()
        .map(|f| f[0].clone())
        .collect();
    assert_eq!(restored, ["detach", "direct", "stock-client"]);
    let bg = g.lines_with("CIO-USB BACKGROUND").join(" ");
    assert!(bg.contains("attached") && bg.contains("relay pid"), "{bg}");
    let detach = &fields(&g, "DETACH")[0];
    assert_eq!(
        detach[2], "0",
        "cio attach exits 0 after a detach: {detach:?}"
    );
    // Link loss: port freed, device back on its driver, exportable again.
    let mut kills: Vec<String> = fields(&g, "KILL").iter().map(|f| f.join(" ")).collect();
    kills.extend(fields(&g, "KILL9").iter().map(|f| f.join(" ")));
    for want in [
        "relay port-freed",
        "relay source-restored",
        "ciod attach-exit 1",
        "ciod port-freed",
        "ciod source-restored",
        "left-on-usbip-host",
        "recovered-at-start",
    ] {
        assert!(kills.iter().any(|k| k == want), "{want}: {kills:?}");
    }
    // Silent link loss on either side is detected by the keepalive pings and
    // the backend's idle limit; nothing stays stuck.
    let silent: Vec<String> = fields(&g, "SILENT").iter().map(|f| f.join(" ")).collect();
    for want in [
        "backend port-freed",
        "backend restored",
        "frontend restored",
        "frontend port-freed",
    ] {
        assert!(silent.iter().any(|k| k == want), "{want}: {silent:?}");
    }
    assert!(
        silent
            .iter()
            .any(|k| k.starts_with("backend attach-exit 1 ")),
        "{silent:?}"
    );
    // The emulated CDC-ACM device, attached the same way, echoes through
    // the guest's cdc_acm tty.
    assert_eq!(
        g.lines_with("CIO-USB ACM")
            .first()
            .map(|l| l.trim_end().ends_with("ACM hello through cio")),
        Some(true),
        "{:?}",
        g.lines_with("CIO-USB ACM")
    );
    // Throughput: cio vs the kernel's own usbip-host/vhci-hcd over TCP.
    let best = |path: &str| {
        let r = rates(&g, path);
        assert!(!r.is_empty(), "no {path} read");
        (r.iter().cloned().fold(0.0, f64::max), r)
    };
    let (kernel, _) = best("stock-server");
    let (relayed, all_relayed) = best("cio");
    let (direct, all_direct) = best("direct");
    let (stock_client, _) = best("stock-client");
    // Straight to stderr: libtest hides eprintln! of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "USB bulk read (16 MiB, O_DIRECT, TCG guest, best of runs): kernel usbip-host/vhci over TCP {kernel:.1} MiB/s; \
         cio relayed {all_relayed:.1?} -> ratio {:.2}; cio --direct {all_direct:.1?} -> ratio {:.2}; \
         stock usbip client via ciod {stock_client:.1} -> ratio {:.2}",
        relayed / kernel,
        direct / kernel,
        stock_client / kernel
    );
    let _ = writeln!(std::io::stderr(), "USB silent link loss: {silent:?}");
}
