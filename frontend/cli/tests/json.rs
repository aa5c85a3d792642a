//! `--json` output parses and carries the documented fields.

mod common;

use std::sync::Arc;

use serde_json::Value;

fn cio_json(args: &[&str]) -> Value {
    let args: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
    let out = common::run(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

#[test]
fn listings_and_descriptions_as_json() {
    let s = common::backend(None);
    let host = s.endpoint().to_string();
    let list = cio_json(&["list", &host]);
    let names: Vec<&str> = list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["edu0", "mem0"]);
    assert_eq!(list["devices"][0]["vendor"], 0x1234);
    assert_eq!(list["devices"][0]["device"], 0x11e8);
    assert_eq!(list["devices"][0]["busy"], false);

    let info = cio_json(&["info", &host, "edu0"]);
    assert_eq!(info["name"], "edu0");
    assert_eq!(info["reset"], "full");
    let bar0 = info["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["index"] == 0)
        .unwrap();
    assert_eq!(bar0["kind"], "mmio");
    assert_eq!(bar0["size"], 1 << 20);
    assert_eq!(bar0["widths"], serde_json::json!([4, 8]));
    let msi = info["irqs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["kind"] == "msi")
        .unwrap();
    assert_eq!(msi["count"], 1);

    let usb = cio_json(&["usb", "list", &host]);
    assert_eq!(usb["devices"][0]["busid"], "emu-1");
    assert!(usb["devices"][0]["interfaces"].as_array().unwrap().len() >= 2);
}

#[test]
fn a_ticket_as_json() {
    use cio_core::{Device, DmaDir, DmaRegion};
    let s = common::backend(None);
    let c = cio_frontend::Client::connect(s.endpoint(), Default::default()).unwrap();
    let mut d = c.open("mem0").unwrap();
    d.dma_map(Arc::new(
        DmaRegion::new(0x4000, 4096, DmaDir::FromDevice).unwrap(),
    ))
    .unwrap();
    let t = c.suspend().unwrap();
    let path = std::env::temp_dir().join(format!("cio-json-ticket-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&path);
    t.save(&path).unwrap();
    let v = cio_json(&["session", "show", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(v["session"], format!("{:#x}", t.session));
    assert_eq!(v["expired"], false);
    assert_eq!(v["devices"][0]["name"], "mem0");
    assert_eq!(v["devices"][0]["mappings"][0]["iova"], 0x4000);
    assert_eq!(v["devices"][0]["mappings"][0]["dir"], "from-device");
}
