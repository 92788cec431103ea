//! A real OpenLDAP `slapd` (Debian's `slapd` package) for one test: its own temp dir, mdb database
//! and loopback port, loaded with students and a service account, killed when dropped. Also a TCP
//! listener that accepts and never answers, for "the directory is slow" tests.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ldap3::{LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use nidan::config::{DirectoryConfig, Secret};
use serde_json::{json, Value};

pub const SUFFIX: &str = "dc=example,dc=ac,dc=jp";
pub const PEOPLE: &str = "ou=people,dc=example,dc=ac,dc=jp";
pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=ac,dc=jp";
pub const ADMIN_PASSWORD: &str = "admin-secret";
pub const SERVICE_DN: &str = "cn=nidan,ou=services,dc=example,dc=ac,dc=jp";
pub const SERVICE_PASSWORD: &str = "service-secret";

/// A student in the test directory.
#[derive(Clone, Copy, Debug)]
pub struct LdapStudent {
    pub username: &'static str,
    pub password: &'static str,
}

/// Japanese names with readings and English forms, two `cn` values, two `ou` values.
pub const TARO: LdapStudent = LdapStudent {
    username: "s2401001",
    password: "Daigaku-Pass-1",
};
pub const HANAKO: LdapStudent = LdapStudent {
    username: "s2401002",
    password: "Daigaku-Pass-2",
};
/// ASCII names only.
pub const ALEX: LdapStudent = LdapStudent {
    username: "s2401003",
    password: "Daigaku-Pass-3",
};

const ENTRIES: &str = r#"dn: dc=example,dc=ac,dc=jp
objectClass: dcObject
objectClass: organization
o: Example University
dc: example

dn: ou=people,dc=example,dc=ac,dc=jp
objectClass: organizationalUnit
ou: people

dn: ou=services,dc=example,dc=ac,dc=jp
objectClass: organizationalUnit
ou: services

dn: cn=nidan,ou=services,dc=example,dc=ac,dc=jp
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: nidan
userPassword: service-secret

dn: uid=s2401001,ou=people,dc=example,dc=ac,dc=jp
objectClass: inetOrgPerson
uid: s2401001
cn: 学生 太郎
cn: Taro Gakusei
sn: 学生
sn;lang-ja;phonetic: ガクセイ
sn;lang-en: Gakusei
givenName: 太郎
givenName;lang-ja;phonetic: タロウ
givenName;lang-en: Taro
employeeNumber: S2401001
ou: 工学部
ou: 情報工学科
mail: taro@example.ac.jp
userPassword: Daigaku-Pass-1

dn: uid=s2401002,ou=people,dc=example,dc=ac,dc=jp
objectClass: inetOrgPerson
uid: s2401002
cn: 大学 花子
sn: 大学
sn;lang-ja;phonetic: ダイガク
givenName: 花子
givenName;lang-ja;phonetic: ハナコ
employeeNumber: S2401002
ou: 文学部
userPassword: Daigaku-Pass-2

dn: uid=s2401003,ou=people,dc=example,dc=ac,dc=jp
objectClass: inetOrgPerson
uid: s2401003
cn: Alex Smith
sn: Smith
givenName: Alex
employeeNumber: S2401003
userPassword: Daigaku-Pass-3
"#;

/// A running slapd; killed (and its files removed) on drop.
pub struct Slapd {
    /// `ldap://127.0.0.1:PORT` (with TLS, StartTLS works on `localhost_url`).
    pub url: String,
    pub port: u16,
    /// `ldaps://localhost:PORT` when started with TLS.
    pub ldaps_url: Option<String>,
    /// The PEM file of the test CA that signed slapd's certificate (for `localhost`, not
    /// 127.0.0.1), when started with TLS.
    pub ca_file: Option<PathBuf>,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// entryUUID by uid.
    uuids: HashMap<String, String>,
}

impl Slapd {
    /// Starts slapd on a free loopback port with the test entries loaded.
    pub async fn start() -> Slapd {
        Self::start_with(false).await
    }

    /// Like `start`, with a certificate from a test CA, StartTLS on `url` and `ldaps_url`.
    pub async fn start_tls() -> Slapd {
        Self::start_with(true).await
    }

    async fn start_with(tls: bool) -> Slapd {
        let slapd = slapd_binary();
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        std::fs::create_dir(root.join("db")).unwrap();
        let ca_file = tls.then(|| make_certificates(root));
        let conf = root.join("slapd.conf");
        std::fs::write(&conf, slapd_conf(root, tls)).unwrap();
        std::fs::write(root.join("entries.ldif"), ENTRIES).unwrap();
        // Loaded offline: slapadd keeps the order of values and adds entryUUID itself.
        run(Command::new(slapd.with_file_name("slapadd"))
            .arg("-f")
            .arg(&conf)
            .arg("-l")
            .arg(root.join("entries.ldif")));

        // Another test may take a port between our probe and slapd's bind: try a few.
        let mut last_log = String::new();
        for _ in 0..8 {
            let port = free_port();
            let url = format!("ldap://127.0.0.1:{port}");
            let ldaps_url = tls.then(|| format!("ldaps://localhost:{}", free_port()));
            let listen = match &ldaps_url {
                Some(ldaps) => format!("{url}/ {}/", ldaps.replace("localhost", "127.0.0.1")),
                None => format!("{url}/"),
            };
            let log = std::fs::File::create(root.join("slapd.log")).unwrap();
            let mut child = Command::new(&slapd)
                .arg("-f")
                .arg(&conf)
                .arg("-h")
                .arg(listen)
                .arg("-d")
                .arg("0")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("slapd starts (apt-get install slapd)");
            if wait_ready(&mut child, &url).await {
                let uuids = read_uuids(&url).await;
                return Slapd {
                    url,
                    port,
                    ldaps_url,
                    ca_file,
                    child: Some(child),
                    dir,
                    uuids,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(root.join("slapd.log")).unwrap_or_default();
        }
        panic!("slapd did not start:\n{last_log}");
    }

    /// `url` with the name slapd's certificate carries.
    pub fn localhost_url(&self) -> String {
        self.url.replace("127.0.0.1", "localhost")
    }

    /// The entryUUID of `username`'s entry.
    pub fn uuid(&self, username: &str) -> String {
        self.uuids
            .get(username)
            .unwrap_or_else(|| panic!("{username} is not in the test directory"))
            .clone()
    }

    /// Kills slapd now (the directory goes down).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The claims every test configuration maps (Japanese readings and English forms included).
    pub fn claims() -> BTreeMap<String, String> {
        [
            ("name", "cn"),
            ("family_name", "sn"),
            ("given_name", "givenName"),
            ("family_name#ja-Kana-JP", "sn;lang-ja;phonetic"),
            ("given_name#ja-Kana-JP", "givenName;lang-ja;phonetic"),
            ("family_name#en", "sn;lang-en"),
            ("given_name#en", "givenName;lang-en"),
            ("student_id", "employeeNumber"),
            ("department", "ou"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Search-then-bind with the service account.
    pub fn search_config(&self) -> DirectoryConfig {
        search_config(&self.url)
    }

    /// Binds straight to `uid={username},ou=people,…` and reads the entry as the student.
    pub fn template_config(&self) -> DirectoryConfig {
        DirectoryConfig {
            bind_dn: String::new(),
            bind_password: Secret::default(),
            base_dn: String::new(),
            user_filter: String::new(),
            dn_template: format!("uid={{username}},{PEOPLE}"),
            ..self.search_config()
        }
    }

    /// The `[directory]` table for a test server (the service password in a file of its own).
    pub fn server_config(&self) -> Value {
        let password_file = self.dir.path().join("service-password");
        std::fs::write(&password_file, format!("{SERVICE_PASSWORD}\n")).unwrap();
        json!({
            "kind": "ldap",
            "url": self.url,
            "bind_dn": SERVICE_DN,
            "bind_password_file": password_file.display().to_string(),
            "base_dn": PEOPLE,
            "user_filter": "(uid={username})",
            "id_attribute": "entryUUID",
            "timeout": "5s",
            "claims": Self::claims(),
        })
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether slapd answers an admin bind within ten seconds (false as soon as it exits).
async fn wait_ready(child: &mut Child, url: &str) -> bool {
    for _ in 0..100 {
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        if let Ok(mut ldap) = admin(url).await {
            let _ = ldap.unbind().await;
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn admin(url: &str) -> ldap3::result::Result<ldap3::Ldap> {
    let settings = LdapConnSettings::new().set_conn_timeout(Duration::from_secs(2));
    let (conn, mut ldap) = LdapConnAsync::with_settings(settings, url).await?;
    ldap3::drive!(conn);
    ldap.with_timeout(Duration::from_secs(5))
        .simple_bind(ADMIN_DN, ADMIN_PASSWORD)
        .await?
        .success()?;
    Ok(ldap)
}

async fn read_uuids(url: &str) -> HashMap<String, String> {
    let mut ldap = admin(url).await.expect("admin bind");
    let (entries, _) = ldap
        .search(PEOPLE, Scope::OneLevel, "(uid=*)", vec!["uid", "entryUUID"])
        .await
        .and_then(|r| r.success())
        .expect("search for entryUUIDs");
    let _ = ldap.unbind().await;
    entries
        .into_iter()
        .map(SearchEntry::construct)
        .map(|e| (e.attrs["uid"][0].clone(), e.attrs["entryUUID"][0].clone()))
        .collect()
}

fn run(command: &mut Command) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?} cannot run (apt-get install slapd openssl): {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA and a server certificate for `localhost` only (openssl); returns the CA file.
fn make_certificates(root: &Path) -> PathBuf {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(Command::new("openssl")
        .current_dir(root)
        .args(["req", "-x509"])
        .args(ec)
        .args(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"])
        .args(["-subj", "/CN=nidan test CA"]));
    run(Command::new("openssl")
        .current_dir(root)
        .arg("req")
        .args(ec)
        .args([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]));
    std::fs::write(
        root.join("server.ext"),
        "subjectAltName = DNS:localhost\nbasicConstraints = CA:FALSE\n\
         keyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .current_dir(root)
        .args([
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
        ])
        .args([
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]));
    root.join("ca.pem")
}

fn slapd_binary() -> PathBuf {
    let installed = PathBuf::from("/usr/sbin/slapd");
    if installed.exists() {
        installed
    } else {
        PathBuf::from("slapd")
    }
}

fn slapd_conf(root: &Path, tls: bool) -> String {
    let tls = if tls {
        format!(
            "TLSCACertificateFile {root}/ca.pem\nTLSCertificateFile {root}/server.pem\n\
             TLSCertificateKeyFile {root}/server.key\n",
            root = root.display()
        )
    } else {
        String::new()
    };
    let root = root.display();
    format!(
        r#"include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
attributeoptions lang- phonetic
{tls}pidfile {root}/slapd.pid
argsfile {root}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 10485760
suffix "{SUFFIX}"
rootdn "{ADMIN_DN}"
rootpw {ADMIN_PASSWORD}
directory {root}/db
access to dn.base="" by * read
access to attrs=userPassword by anonymous auth by * none
access to dn.subtree="{PEOPLE}" by self read by dn.exact="{SERVICE_DN}" read by * none
access to * by users read by * none
"#
    )
}

/// Search-then-bind at `url` with the service account, mapping `Slapd::claims`.
pub fn search_config(url: &str) -> DirectoryConfig {
    DirectoryConfig {
        kind: "ldap".into(),
        url: url.to_string(),
        bind_dn: SERVICE_DN.into(),
        bind_password: Secret::new(SERVICE_PASSWORD),
        base_dn: PEOPLE.into(),
        user_filter: "(uid={username})".into(),
        id_attribute: "entryUUID".into(),
        timeout: Duration::from_secs(5),
        claims: Slapd::claims(),
        ..DirectoryConfig::default()
    }
}

/// A loopback port nobody listens on (at the moment of asking).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().unwrap().port()
}

/// A directory that accepts connections and never answers; stops when dropped.
pub struct SilentListener {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl SilentListener {
    pub async fn start() -> SilentListener {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ldap://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        SilentListener { url, task }
    }
}

impl Drop for SilentListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
