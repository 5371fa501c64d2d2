//! TLS: STARTTLS with X.509 credentials against libnbd (nbdsh), the on/require policies, mutual
//! TLS, and clients that misbehave around the upgrade.
//!
//! Certificates are made for each run with the `openssl` command; the tests skip, saying why,
//! without it or without nbdsh.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use common::{require, Raw, Scratch};
use userdm_nbd::proto::{InfoRequest, OptionType, ReplyType};
use userdm_nbd::{
    serve_tcp, serve_unix, Exports, ListenAddr, MemBackend, NbdServer, ServerConfig, TlsConfig,
    TlsMode,
};

/// A CA, a server certificate (CN and SAN localhost) and a client certificate, all signed by
/// the CA; and a directory laid out as libnbd (gnutls) expects: ca-cert.pem, and for mutual TLS
/// client-cert.pem and client-key.pem.
struct Pki {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    fn make(scratch: &Scratch) -> Pki {
        let dir = scratch.path("pki");
        std::fs::create_dir_all(dir.join("client")).unwrap();
        std::fs::create_dir_all(dir.join("anon")).unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=userdm test CA",
        ]);
        openssl(&dir, &ca);
        for (who, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
            let mut req = vec!["req"];
            req.extend(ec);
            let (key, csr) = (format!("{who}-key.pem"), format!("{who}.csr"));
            req.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"]);
            openssl(&dir, &req);
            let ext = format!("{who}.ext");
            std::fs::write(
                dir.join(&ext),
                format!(
                    "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
                     keyUsage=digitalSignature\nextendedKeyUsage={usage}\n"
                ),
            )
            .unwrap();
            let cert = format!("{who}-cert.pem");
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca-cert.pem",
                    "-CAkey",
                    "ca-key.pem",
                    "-CAcreateserial",
                    "-out",
                    &cert,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ],
            );
        }
        // Another CA, that signed nothing here.
        let mut other = vec!["req", "-x509"];
        other.extend(ec);
        other.extend([
            "-keyout",
            "other-key.pem",
            "-out",
            "other-ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=other CA",
        ]);
        openssl(&dir, &other);
        for sub in ["client", "anon"] {
            std::fs::copy(dir.join("ca-cert.pem"), dir.join(sub).join("ca-cert.pem")).unwrap();
        }
        std::fs::copy(
            dir.join("client-cert.pem"),
            dir.join("client/client-cert.pem"),
        )
        .unwrap();
        std::fs::copy(
            dir.join("client-key.pem"),
            dir.join("client/client-key.pem"),
        )
        .unwrap();
        Pki { dir }
    }

    fn config(&self, mode: TlsMode, verify_clients: bool) -> ServerConfig {
        let ca = self.dir.join("ca-cert.pem");
        let tls = TlsConfig::from_pem_files(
            mode,
            &self.dir.join("server-cert.pem"),
            &self.dir.join("server-key.pem"),
            verify_clients.then_some(ca.as_path()),
        )
        .unwrap();
        let mut config = ServerConfig::default();
        config.handshake.tls = Some(tls);
        config.handshake_timeout = Some(Duration::from_secs(5));
        config
    }
}

fn server(
    scratch: &Scratch,
    name: &str,
    config: ServerConfig,
) -> (NbdServer, PathBuf, Arc<MemBackend>) {
    let mem = Arc::new(MemBackend::new(16 << 20));
    let socket = scratch.path(name);
    let s = serve_unix(
        &socket,
        Exports::new().with("disk", "", mem.clone()),
        config,
    )
    .unwrap();
    (s, socket, mem)
}

/// Runs an nbdsh script; returns whether it succeeded, and its output.
fn nbdsh(script: &str) -> (bool, String) {
    let path = std::env::var("PATH").unwrap_or_default();
    let out: Output = Command::new("timeout")
        .env("PATH", format!("/usr/bin:/bin:{path}"))
        .args(["60", "nbdsh", "-c", script])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Connects with TLS (`tls`: libnbd's TLS_DISABLE 0, ALLOW 1, REQUIRE 2) using the
/// certificates in `certs`, writes, reads back and flushes; prints whether TLS was used.
fn client_script(socket: &Path, tls: u32, certs: &Path) -> String {
    format!(
        "h.set_tls({tls})\n\
         h.set_tls_certificates('{certs}')\n\
         h.set_export_name('disk')\n\
         h.connect_unix('{socket}')\n\
         print('tls=%s' % h.get_tls_negotiated())\n\
         data = bytes(range(256)) * 4096\n\
         h.pwrite(data, 65536)\n\
         assert h.pread(len(data), 65536) == data\n\
         h.flush()\n\
         h.shutdown()\n",
        certs = certs.display(),
        socket = socket.display()
    )
}

fn tools(scratch: &Scratch) -> Option<Pki> {
    if !require("nbdsh") || !require("openssl") {
        return None;
    }
    Some(Pki::make(scratch))
}

#[test]
fn require_mode_serves_tls_clients_only() {
    let scratch = Scratch::new("tls-require");
    let Some(pki) = tools(&scratch) else { return };
    let (server, socket, mem) = server(&scratch, "s.sock", pki.config(TlsMode::Require, false));
    let (ok, out) = nbdsh(&client_script(&socket, 2, &pki.dir.join("anon")));
    assert!(ok && out.contains("tls=True"), "{out}");
    assert_eq!(
        mem.snapshot(65536, 256)[..],
        (0..=255u8).collect::<Vec<_>>()[..]
    );
    // Without TLS the client cannot get in.
    let (ok, out) = nbdsh(&client_script(&socket, 0, &pki.dir.join("anon")));
    assert!(!ok, "a plain client got in: {out}");
    server.shutdown();
    // Over TCP to "localhost" libnbd checks the certificate (over a Unix socket it has no host
    // name to check it against): signed by the CA, it is accepted; by an unknown CA, refused.
    let mem = Arc::new(MemBackend::new(1 << 20));
    let tcp = serve_tcp(
        "127.0.0.1:0",
        Exports::new().with("disk", "", mem),
        pki.config(TlsMode::Require, false),
    )
    .unwrap();
    let ListenAddr::Tcp(addr) = tcp.local_addr().clone() else {
        panic!("not TCP")
    };
    let script = |certs: &Path| {
        format!(
            "h.set_tls(2)\nh.set_tls_certificates('{}')\nh.connect_tcp('localhost', '{}')\n\
             print('tls=%s' % h.get_tls_negotiated())\nh.shutdown()\n",
            certs.display(),
            addr.port()
        )
    };
    let (ok, out) = nbdsh(&script(&pki.dir.join("anon")));
    assert!(ok && out.contains("tls=True"), "{out}");
    let untrusted = scratch.path("untrusted");
    std::fs::create_dir_all(&untrusted).unwrap();
    std::fs::copy(pki.dir.join("other-ca.pem"), untrusted.join("ca-cert.pem")).unwrap();
    let (ok, out) = nbdsh(&script(&untrusted));
    assert!(!ok, "a client that does not trust the CA connected: {out}");
    tcp.shutdown();
}

#[test]
fn on_mode_serves_both() {
    let scratch = Scratch::new("tls-on");
    let Some(pki) = tools(&scratch) else { return };
    let (server, socket, _) = server(&scratch, "s.sock", pki.config(TlsMode::On, false));
    let (ok, out) = nbdsh(&client_script(&socket, 1, &pki.dir.join("anon")));
    assert!(ok && out.contains("tls=True"), "{out}");
    let (ok, out) = nbdsh(&client_script(&socket, 0, &pki.dir.join("anon")));
    assert!(ok && out.contains("tls=False"), "{out}");
    let stats = server.stats();
    assert_eq!((stats.accepted, stats.tls), (2, 1), "{stats:?}");
    server.shutdown();
}

#[test]
fn mutual_tls_needs_a_client_certificate() {
    let scratch = Scratch::new("tls-mutual");
    let Some(pki) = tools(&scratch) else { return };
    let (server, socket, _) = server(&scratch, "s.sock", pki.config(TlsMode::Require, true));
    let (ok, out) = nbdsh(&client_script(&socket, 2, &pki.dir.join("client")));
    assert!(ok && out.contains("tls=True"), "{out}");
    let (ok, _) = nbdsh(&client_script(&socket, 2, &pki.dir.join("anon")));
    assert!(!ok, "a client without a certificate got in");
    server.shutdown();
}

#[test]
fn credentials_errors_name_the_file() {
    let scratch = Scratch::new("tls-errors");
    let missing = scratch.path("nope.pem");
    let e = TlsConfig::from_pem_files(TlsMode::On, &missing, &missing, None).unwrap_err();
    assert!(e.to_string().contains("nope.pem"), "{e}");
    let junk = scratch.path("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let e = TlsConfig::from_pem_files(TlsMode::On, &junk, &junk, None).unwrap_err();
    assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
    assert!("sometimes".parse::<TlsMode>().is_err());
    assert_eq!("require".parse::<TlsMode>().unwrap(), TlsMode::Require);
}

/// Reads (an alert, perhaps) until the server closes; false if it stays open 10 s.
fn hangs_up(c: &mut Raw) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    loop {
        match c.s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn hostile_clients_around_starttls() {
    let scratch = Scratch::new("tls-hostile");
    let Some(pki) = tools(&scratch) else { return };
    let (server, socket, _) = server(&scratch, "s.sock", pki.config(TlsMode::Require, false));
    let go = |raw: &mut Raw| {
        let mut data = Vec::new();
        InfoRequest::encode("disk", &[], &mut data).unwrap();
        raw.option(OptionType::GO, &data);
        raw.option_reply().0
    };
    // Options before STARTTLS: TLS_REQD, and negotiation goes on.
    let mut c = Raw::connect(&socket);
    assert_eq!(go(&mut c), ReplyType::ERR_TLS_REQD);
    c.option(OptionType::LIST, &[]);
    assert_eq!(c.option_reply().0, ReplyType::ERR_TLS_REQD);
    c.option(OptionType::STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().0, ReplyType::ERR_TLS_REQD);
    // STARTTLS with data is invalid.
    c.option(OptionType::STARTTLS, b"x");
    assert_eq!(c.option_reply().0, ReplyType::ERR_INVALID);
    // EXPORT_NAME has no error reply: the server hangs up.
    c.option(OptionType::EXPORT_NAME, b"disk");
    assert!(c.closed());
    // STARTTLS acknowledged, then garbage instead of a ClientHello: the server hangs up.
    let mut c = Raw::connect(&socket);
    c.option(OptionType::STARTTLS, &[]);
    assert_eq!(c.option_reply().0, ReplyType::ACK);
    c.s.write_all(&[0x16, 3, 1, 0xff, 0xff, 1, 2, 3]).unwrap();
    c.s.write_all(&[0u8; 4096]).unwrap_or(());
    assert!(hangs_up(&mut c), "garbage after STARTTLS was not refused");
    // STARTTLS acknowledged, then silence: the handshake times out and the thread is freed.
    let mut c = Raw::connect(&socket);
    c.option(OptionType::STARTTLS, &[]);
    assert_eq!(c.option_reply().0, ReplyType::ACK);
    assert!(hangs_up(&mut c), "a silent client was not dropped");
    // ... and a well-behaved TLS client is served all along.
    let (ok, out) = nbdsh(&client_script(&socket, 2, &pki.dir.join("anon")));
    assert!(ok, "{out}");
    let stats = server.stats();
    assert!(stats.handshakes_failed >= 3, "{stats:?}");
    server.shutdown();
}

/// The fuzz target `nbd_tls_handshake`'s harness on stable Rust: random scripts (and scripts
/// that do send STARTTLS) never panic the TLS-aware handshake, whatever the policy.
#[test]
fn handshake_tls_survives_random_scripts() {
    use proptest::prelude::*;
    use userdm_nbd::export_info;
    use userdm_nbd::handshake::{handshake_tls, ExportCatalogue, ExportInfo, HandshakeConfig};

    struct Duplex {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl std::io::Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl std::io::Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    struct One(ExportInfo);
    impl ExportCatalogue for One {
        type Export = ();
        fn exports(&self) -> Vec<ExportInfo> {
            vec![self.0.clone()]
        }
        fn open(&self, name: &str) -> Option<(ExportInfo, ())> {
            self.info(name).map(|i| (i, ()))
        }
    }

    let scratch = Scratch::new("tls-prop");
    if !require("openssl") {
        return;
    }
    let pki = Pki::make(&scratch);
    let mem = MemBackend::new(1 << 20);
    let catalogue = One(export_info("disk", "", &mem));
    let configs: Vec<HandshakeConfig> = [TlsMode::On, TlsMode::Require]
        .into_iter()
        .map(|mode| pki.config(mode, false).handshake)
        .collect();
    let option = |o: u32, data: &[u8]| {
        let mut v = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
        v.extend(o.to_be_bytes());
        v.extend((data.len() as u32).to_be_bytes());
        v.extend(data);
        v
    };
    let ops = prop_oneof![
        Just(option(5, &[])),
        Just(option(7, b"\0\0\0\x04disk\0\0")),
        Just(option(1, b"disk")),
        Just(option(8, &[])),
        proptest::collection::vec(any::<u8>(), 0..64),
    ];
    proptest!(ProptestConfig::with_cases(300), |(pick in 0usize..2, parts in proptest::collection::vec(ops, 0..6))| {
        let mut script = 3u32.to_be_bytes().to_vec();
        for p in parts {
            script.extend(p);
        }
        let mut stream = Duplex { input: std::io::Cursor::new(script), output: Vec::new() };
        let _ = handshake_tls(&mut stream, &catalogue, &configs[pick]);
        prop_assert!(stream.output.starts_with(b"NBDMAGIC"));
    });
}

/// Shutting the server down with a TLS client connected drains and returns: the pump threads
/// see the socket's end, the connection answers what is in flight, and every thread is joined.
#[test]
fn shutdown_with_a_tls_client_connected() {
    let scratch = Scratch::new("tls-shutdown");
    let Some(pki) = tools(&scratch) else { return };
    let (server, socket, _) = server(&scratch, "s.sock", pki.config(TlsMode::Require, false));
    let script = format!(
        "import time\n\
         h.set_tls(2)\n\
         h.set_tls_certificates('{}')\n\
         h.set_export_name('disk')\n\
         h.connect_unix('{}')\n\
         h.pwrite(b'q' * 4096, 0)\n\
         print('connected', flush=True)\n\
         time.sleep(30)\n",
        pki.dir.join("anon").display(),
        socket.display()
    );
    let path = std::env::var("PATH").unwrap_or_default();
    let mut client = Command::new("nbdsh")
        .env("PATH", format!("/usr/bin:/bin:{path}"))
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while server.stats().tls == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the client never connected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = std::time::Instant::now();
    server.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        started.elapsed()
    );
    let _ = client.kill();
    let _ = client.wait();
}
