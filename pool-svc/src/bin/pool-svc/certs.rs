//! `pool-svc certs`: a development CA and the engine and client certificates for mutual TLS,
//! in one step ([`rsvc_server::certs`] says what it makes and why).
//!
//! Stdout lists the files written, one per line (or JSON with `--json`); the next steps go to
//! stderr, so that the list stays a list.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rsvc_server::certs::{engine_files, generate, parse_user_spec, user_files, CertSpec, CA_CERT, CA_KEY};

/// Options of `certs`.
#[derive(clap::Args, Debug)]
pub(crate) struct CertsArgs {
    /// The directory to write into; created with mode 0700 if missing. A CA already in it
    /// (`ca.crt` and `ca.key`) signs the new certificates.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// An engine rank to make a certificate for (repeat or comma-separate). Without --rank and
    /// --user: ranks 1, 2 and 3, and the user admin in group admin.
    #[arg(long = "rank", value_name = "RANK", value_delimiter = ',')]
    ranks: Vec<u32>,
    /// A client to make a certificate for: `USER` or `USER:GROUP,GROUP...` (repeat). Members
    /// of group `admin` administer the system.
    #[arg(long = "user", value_name = "USER[:GROUPS]", value_parser = parse_user_spec)]
    users: Vec<(String, Vec<String>)>,
    /// How many days the engine and client certificates are valid (a new CA: ten years, or
    /// longer to cover them).
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36500))]
    days: u32,
    /// Replace the named engines' and users' certificates and keys if they exist (never the
    /// CA's).
    #[arg(long)]
    force: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Makes the certificates, prints what it wrote and what to do next.
pub(crate) fn run(args: CertsArgs) -> Result<(), String> {
    let mut spec = CertSpec::new(&args.out);
    spec.ranks = args.ranks;
    spec.users = args.users;
    if spec.ranks.is_empty() && spec.users.is_empty() {
        spec.ranks = vec![1, 2, 3];
        spec.users = vec![("admin".into(), vec!["admin".into()])];
    }
    spec.valid_for = Duration::from_secs(u64::from(args.days) * 86_400);
    spec.force = args.force;
    let written = generate(&spec)?;
    let dir = &spec.out;
    let (ca_crt, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let ca_created = written.contains(&ca_crt);
    if args.json {
        let path = |p: &Path| p.display().to_string();
        let v = serde_json::json!({
            "dir": path(dir),
            "ca": { "cert": path(&ca_crt), "key": path(&ca_key), "created": ca_created },
            "engines": spec.ranks.iter().map(|&r| {
                let (c, k) = engine_files(dir, r);
                serde_json::json!({ "rank": r, "cert": path(&c), "key": path(&k) })
            }).collect::<Vec<_>>(),
            "users": spec.users.iter().map(|(u, g)| {
                let (c, k) = user_files(dir, u);
                serde_json::json!({ "user": u, "groups": g, "cert": path(&c), "key": path(&k) })
            }).collect::<Vec<_>>(),
            "written": written.iter().map(|p| path(p)).collect::<Vec<_>>(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        );
        return Ok(());
    }
    for p in &written {
        println!("{}", p.display());
    }
    eprintln!();
    if !ca_created {
        eprintln!("Signed with the existing CA in {}.", ca_crt.display());
    }
    eprintln!("Next steps:");
    let ca = ca_crt.display();
    if let Some(&r) = spec.ranks.first() {
        let (c, k) = engine_files(dir, r);
        eprintln!(
            "  engine rank {r}:  pool-svc serve --rank {r} ... --tls-ca {ca} --tls-cert {} --tls-key {}",
            c.display(),
            k.display()
        );
    }
    if let Some((u, _)) = spec.users.first() {
        let (c, k) = user_files(dir, u);
        eprintln!(
            "  client {u}:  pool-svc system status ... --tls-ca {ca} --tls-cert {} --tls-key {}",
            c.display(),
            k.display()
        );
    }
    if spec.ranks.len() + spec.users.len() > 1 {
        eprintln!("  (the others likewise, with their own files)");
    }
    eprintln!(
        "Keep {} private: whoever reads it can make a certificate for any user or engine.",
        ca_key.display()
    );
    Ok(())
}
