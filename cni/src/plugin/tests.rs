//! Spec conformance of the plugin: VERSION, error objects and codes, prevResult passed through
//! byte for byte in every supported version, CHECK, STATUS and GC (1.1.0), DEL idempotent,
//! and the fail policy, against a stand-in agent on a real Unix socket.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

use super::*;

/// The requests a stand-in agent got, with the inode of the descriptor that came along.
type Seen = Arc<Mutex<Vec<(Request, Option<u64>)>>>;

/// A stand-in agent: answers every request with `outcome`, records what it got (and the
/// inode of the descriptor that came with it).
struct FakeAgent {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    seen: Seen,
}

fn fake_agent(outcome: Outcome) -> FakeAgent {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        // Bounded: the tests make fewer connections than this.
        for stream in listener.incoming().take(16) {
            let Ok(stream) = stream else { return };
            let Ok((request, fds)) = protocol::receive::<Request>(&stream) else {
                continue;
            };
            let inode = fds
                .into_iter()
                .next()
                .map(|fd| std::fs::File::from(fd).metadata().unwrap().ino());
            record.lock().unwrap().push((request, inode));
            let mut reply = Reply::new(outcome, "because the test says so");
            reply.virtual_node = Some("shop/cart".into());
            let _ = protocol::send(&stream, &reply, None);
        }
    });
    FakeAgent {
        _dir: dir,
        socket,
        seen,
    }
}

fn netns_inode() -> u64 {
    std::fs::metadata("/proc/self/ns/net").unwrap().ino()
}

fn env_for(command: &str, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/proc/self/ns/net"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=u-1",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        if v.is_empty() {
            env.remove(*k);
        } else {
            env.insert(k.to_string(), v.to_string());
        }
    }
    env
}

fn invoke(env: &BTreeMap<String, String>, stdin: &str) -> Output {
    run(&|name| env.get(name).cloned(), stdin.as_bytes())
}

fn error_of(output: &Output) -> (u32, String) {
    assert_ne!(output.code, 0, "{output:?}");
    let v: Value = serde_json::from_str(&output.stdout).unwrap();
    assert!(v["cniVersion"].is_string(), "{v}");
    (
        v["code"].as_u64().unwrap() as u32,
        v["msg"].as_str().unwrap().to_string(),
    )
}

/// A previous result as a plugin of `version` prints it (odd spacing and key order, so a
/// re-encoding would show).
fn prev_result(version: &str) -> String {
    let ip_version = if version.starts_with("0.") {
        r#""version": "4", "#
    } else {
        ""
    };
    format!(
        r#"{{"interfaces": [{{"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"}}, {{"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/var/run/netns/x"}}],
  "ips": [{{{ip_version}"interface": 1, "address": "10.244.1.5/24", "gateway": "10.244.1.1"}}, {{"interface": 0, "address": "10.244.1.1/24"}}, {{"address": "fd00::5/64"}}],
  "cniVersion":"{version}", "dns": {{}}}}"#
    )
}

fn config(version: &str, socket: &Path, extra: &str, prev: Option<&str>) -> String {
    let prev = prev
        .map(|p| format!(", \"prevResult\": {p}"))
        .unwrap_or_default();
    format!(
        r#"{{"cniVersion": "{version}", "name": "k8s-pod-network", "type": "strait-cni", "agentSocket": "{}", "timeoutSeconds": 2{extra}{prev}}}"#,
        socket.display()
    )
}

#[test]
fn version_lists_every_supported_version() {
    let out = invoke(&env_for("VERSION", &[]), r#"{"cniVersion": "1.0.0"}"#);
    assert_eq!(out.code, 0);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(
        v["supportedVersions"],
        serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    // VERSION needs no configuration at all.
    assert_eq!(invoke(&env_for("VERSION", &[]), "").code, 0);
}

#[test]
fn add_passes_prev_result_through_byte_for_byte_in_every_version() {
    for version in SUPPORTED_VERSIONS {
        let agent = fake_agent(Outcome::Enrolled);
        let prev = prev_result(version);
        let out = invoke(
            &env_for("ADD", &[]),
            &config(version, &agent.socket, "", Some(&prev)),
        );
        assert_eq!(out.code, 0, "{version}: {out:?}");
        assert_eq!(out.stdout, prev, "{version}");
        let seen = agent.seen.lock().unwrap();
        let (request, inode) = &seen[0];
        assert_eq!(request.op, Op::Add);
        assert_eq!(request.version, protocol::VERSION);
        assert_eq!(request.container_id, "c0ffee");
        assert_eq!(request.netns, "/proc/self/ns/net");
        assert_eq!(
            request.pod,
            Some(PodRef {
                namespace: "shop".into(),
                name: "cart-1".into(),
                uid: Some("u-1".into())
            })
        );
        // The container's addresses: not the host-side bridge's.
        let ips: Vec<IpAddr> = vec!["10.244.1.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        assert_eq!(request.ips, ips, "{version}");
        assert_eq!(
            *inode,
            Some(netns_inode()),
            "the netns rides along as a descriptor"
        );
        assert!(request.timeout_ms > 0 && request.timeout_ms <= 2000);
    }
}

#[test]
fn not_in_mesh_also_passes_through() {
    let agent = fake_agent(Outcome::NotInMesh);
    let prev = prev_result("1.0.0");
    let out = invoke(
        &env_for("ADD", &[]),
        &config("1.0.0", &agent.socket, "", Some(&prev)),
    );
    assert_eq!((out.code, out.stdout), (0, prev));
}

#[test]
fn bad_input_gets_an_error_object_naming_the_field() {
    let socket = Path::new("/nonexistent/strait.sock");
    let prev = prev_result("1.0.0");
    let good = config("1.0.0", socket, "", Some(&prev));
    let cases: Vec<(BTreeMap<String, String>, String, u32, &str)> = vec![
        (
            env_for("", &[("CNI_COMMAND", "")]),
            good.clone(),
            4,
            "CNI_COMMAND",
        ),
        (
            env_for("ADD", &[]),
            "{\"cniVersion\": \n \"1.0.0\",".into(),
            6,
            "line 2",
        ),
        (env_for("ADD", &[]), "[1]".into(), 6, "not a JSON object"),
        (
            env_for("ADD", &[]),
            r#"{"name": "n", "type": "strait-cni"}"#.into(),
            7,
            "`cniVersion`",
        ),
        (
            env_for("ADD", &[]),
            config("0.2.0", socket, "", Some(&prev)),
            1,
            "0.2.0 is not supported",
        ),
        (
            env_for("ADD", &[]),
            config(
                "1.0.0",
                socket,
                r#", "failPolicy": "sometimes""#,
                Some(&prev),
            ),
            7,
            "`failPolicy`",
        ),
        (
            env_for("ADD", &[]),
            config("1.0.0", socket, r#", "timeoutSeconds": 0"#, Some(&prev)),
            7,
            "`timeoutSeconds`",
        ),
        (
            env_for("ADD", &[]),
            config(
                "1.0.0",
                socket,
                r#", "failOpenNamespaces": "kube-system""#,
                Some(&prev),
            ),
            7,
            "`failOpenNamespaces`",
        ),
        (
            env_for("ADD", &[]),
            config("1.0.0", socket, "", None),
            7,
            "`prevResult`",
        ),
        (
            env_for("ADD", &[]),
            config(
                "1.0.0",
                socket,
                "",
                Some(r#"{"ips": [{"address": "nope"}]}"#),
            ),
            7,
            "prevResult.ips[0].address",
        ),
        (
            env_for("ADD", &[("CNI_ARGS", "")]),
            good.clone(),
            4,
            "CNI_ARGS",
        ),
        (
            env_for(
                "ADD",
                &[("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop")],
            ),
            good.clone(),
            4,
            "K8S_POD_NAME",
        ),
        (
            env_for("ADD", &[("CNI_ARGS", "K8S_POD_NAMESPACE")]),
            good.clone(),
            4,
            "not KEY=VALUE",
        ),
        (
            env_for("ADD", &[("CNI_NETNS", "")]),
            good.clone(),
            4,
            "CNI_NETNS",
        ),
        (
            env_for("ADD", &[("CNI_CONTAINERID", "")]),
            good.clone(),
            4,
            "CNI_CONTAINERID",
        ),
        (
            env_for("ADD", &[("CNI_NETNS", "/nonexistent/netns")]),
            good.clone(),
            5,
            "/nonexistent/netns",
        ),
        (
            env_for("CHECK", &[]),
            config("0.3.1", socket, "", Some(&prev)),
            1,
            "CHECK",
        ),
        (
            env_for("STATUS", &[]),
            config("1.0.0", socket, "", None),
            1,
            "STATUS",
        ),
        (env_for("FROB", &[]), good.clone(), 4, "FROB"),
    ];
    for (env, stdin, code, needle) in cases {
        let out = invoke(&env, &stdin);
        let (got, msg) = error_of(&out);
        assert_eq!(got, code, "{needle}: {msg}");
        assert!(msg.contains(needle), "expected `{needle}` in: {msg}");
    }
}

#[test]
fn an_unreachable_agent_fails_add_closed_by_default_and_open_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let prev = prev_result("1.0.0");
    let started = Instant::now();
    let out = invoke(
        &env_for("ADD", &[]),
        &config("1.0.0", &socket, "", Some(&prev)),
    );
    let (code, msg) = error_of(&out);
    assert_eq!(code, code::TRY_AGAIN_LATER);
    assert!(msg.contains("no strait agent answers"), "{msg}");
    // It kept trying for the whole timeout (2 s) in case the agent was restarting.
    assert!(started.elapsed() >= Duration::from_millis(1800));

    let open = config(
        "1.0.0",
        &socket,
        r#", "timeoutSeconds": 1, "failPolicy": "open""#,
        Some(&prev),
    )
    .replace(r#""timeoutSeconds": 2, "#, "");
    let out = invoke(&env_for("ADD", &[]), &open);
    assert_eq!((out.code, out.stdout.as_str()), (0, prev.as_str()));
    assert!(out.stderr.contains("WITHOUT strait capture"), "{out:?}");

    let by_namespace = config(
        "1.0.0",
        &socket,
        r#", "failOpenNamespaces": ["shop"]"#,
        Some(&prev),
    );
    let out = invoke(&env_for("ADD", &[]), &by_namespace);
    assert_eq!(out.code, 0, "{out:?}");

    // An excluded namespace never asks the agent.
    let excluded = config(
        "1.0.0",
        &socket,
        r#", "excludeNamespaces": ["shop"]"#,
        Some(&prev),
    );
    let started = Instant::now();
    let out = invoke(&env_for("ADD", &[]), &excluded);
    assert_eq!((out.code, out.stdout.as_str()), (0, prev.as_str()));
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[test]
fn an_agent_that_cannot_enroll_fails_add_with_its_reason() {
    let agent = fake_agent(Outcome::Failed);
    let prev = prev_result("1.0.0");
    let (code, msg) = error_of(&invoke(
        &env_for("ADD", &[]),
        &config("1.0.0", &agent.socket, "", Some(&prev)),
    ));
    assert_eq!(code, code::TRY_AGAIN_LATER);
    assert!(msg.contains("because the test says so"), "{msg}");
    let refusing = fake_agent(Outcome::Refused);
    let (code, _) = error_of(&invoke(
        &env_for("ADD", &[]),
        &config("1.0.0", &refusing.socket, "", Some(&prev)),
    ));
    assert_eq!(code, code::REFUSED);
}

#[test]
fn check_asks_the_agent_about_this_namespace() {
    let prev = prev_result("0.4.0");
    let agent = fake_agent(Outcome::Enrolled);
    let out = invoke(
        &env_for("CHECK", &[]),
        &config("0.4.0", &agent.socket, "", Some(&prev)),
    );
    assert_eq!((out.code, out.stdout.as_str()), (0, ""));
    let seen = agent.seen.lock().unwrap();
    assert_eq!(seen[0].0.op, Op::Check);
    assert_eq!(seen[0].1, Some(netns_inode()));
    let failing = fake_agent(Outcome::Failed);
    let (code, msg) = error_of(&invoke(
        &env_for("CHECK", &[]),
        &config("1.1.0", &failing.socket, "", Some(&prev)),
    ));
    assert_eq!(code, code::NOT_ENROLLED);
    assert!(msg.contains("not enrolled"), "{msg}");
}

#[test]
fn status_and_gc_in_1_1_0() {
    let agent = fake_agent(Outcome::Ready);
    let out = invoke(
        &env_for("STATUS", &[]),
        &config("1.1.0", &agent.socket, "", None),
    );
    assert_eq!((out.code, out.stdout.as_str()), (0, ""));
    let missing = Path::new("/nonexistent/strait.sock");
    let (code, _) = error_of(&invoke(
        &env_for("STATUS", &[]),
        &config("1.1.0", missing, "", None),
    ));
    assert_eq!(code, code::NOT_AVAILABLE);
    let out = invoke(
        &env_for("STATUS", &[]),
        &config("1.1.0", missing, r#", "failPolicy": "open""#, None),
    );
    assert_eq!(out.code, 0);

    let gc = fake_agent(Outcome::Released);
    let valid = r#", "cni.dev/valid-attachments": [{"containerID": "a1", "ifname": "eth0"}]"#;
    let out = invoke(
        &env_for("GC", &[]),
        &config("1.1.0", &gc.socket, valid, None),
    );
    assert_eq!((out.code, out.stdout.as_str()), (0, ""));
    let seen = gc.seen.lock().unwrap();
    assert_eq!(seen[0].0.op, Op::Gc);
    assert_eq!(
        seen[0].0.valid_attachments,
        [Attachment {
            container_id: "a1".into(),
            ifname: "eth0".into()
        }]
    );
    let (code, msg) = error_of(&invoke(
        &env_for("GC", &[]),
        &config("1.1.0", &gc.socket, "", None),
    ));
    assert_eq!(code, code::INVALID_CONFIG);
    assert!(msg.contains("cni.dev/valid-attachments"), "{msg}");
}

#[test]
fn del_is_idempotent_and_never_fails_for_want_of_an_agent() {
    let agent = fake_agent(Outcome::Released);
    let stdin = config("1.0.0", &agent.socket, "", Some(&prev_result("1.0.0")));
    for _ in 0..2 {
        let out = invoke(&env_for("DEL", &[]), &stdin);
        assert_eq!((out.code, out.stdout.as_str()), (0, ""));
    }
    assert_eq!(agent.seen.lock().unwrap().len(), 2);
    assert!(
        agent
            .seen
            .lock()
            .unwrap()
            .iter()
            .all(|(r, fd)| r.op == Op::Del && fd.is_none())
    );
    // No netns, no CNI_ARGS, no prevResult, no agent: still success.
    let missing = Path::new("/nonexistent/strait.sock");
    let out = invoke(
        &env_for("DEL", &[("CNI_NETNS", ""), ("CNI_ARGS", "")]),
        &config("1.0.0", missing, "", None),
    );
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{out:?}");
}

#[test]
fn a_request_the_agent_closes_unanswered_is_asked_again_on_a_new_connection() {
    // The first agent reads the ADD and closes without an answer (it handed over to a
    // successor during an upgrade); the plugin asks again and the second answer counts.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().take(2).enumerate() {
            let Ok(stream) = stream else { return };
            let Ok((request, fds)) = protocol::receive::<Request>(&stream) else {
                continue;
            };
            let inode = fds
                .into_iter()
                .next()
                .map(|fd| std::fs::File::from(fd).metadata().unwrap().ino());
            record.lock().unwrap().push((request, inode));
            if n == 1 {
                let _ = protocol::send(&stream, &Reply::new(Outcome::Enrolled, ""), None);
            }
        }
    });
    let prev = prev_result("1.0.0");
    let out = invoke(
        &env_for("ADD", &[]),
        &config("1.0.0", &socket, "", Some(&prev)),
    );
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, prev.as_str()),
        "{out:?}"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    // The same request both times, with the pod's network namespace.
    for (request, inode) in seen.iter() {
        assert_eq!(request.op, Op::Add);
        assert_eq!(request.container_id, "c0ffee");
        assert_eq!(*inode, Some(netns_inode()));
    }
}
