//! `whispeer cert`: a development CA and certificates for trying TLS, written as PEM files.
//!
//! For development only: the CA key is written next to the certificates, unencrypted.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// `whispeer cert`.
#[derive(Debug, Args)]
pub(crate) struct CertArgs {
    /// Directory to write ca.pem, ca-key.pem, cert.pem and key.pem (and client-*.pem) into.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Names and addresses the server certificate is valid for (repeatable).
    #[arg(long = "host", default_values = ["localhost", "127.0.0.1"])]
    hosts: Vec<String>,
    /// Also write a client certificate (client-cert.pem, client-key.pem) signed by the CA.
    #[arg(long)]
    client: bool,
}

fn write(dir: &Path, name: &str, contents: &str) -> anyhow::Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))
}

fn make(args: &CertArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "whispeer development CA");
    let ca = ca_params.self_signed(&ca_key)?;
    write(&args.out, "ca.pem", &ca.pem())?;
    write(&args.out, "ca-key.pem", &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(args.hosts.clone())?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    write(&args.out, "cert.pem", &params.signed_by(&key, &issuer)?.pem())?;
    write(&args.out, "key.pem", &key.serialize_pem())?;

    if args.client {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["whispeer-client".to_string()])?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        write(&args.out, "client-cert.pem", &params.signed_by(&key, &issuer)?.pem())?;
        write(&args.out, "client-key.pem", &key.serialize_pem())?;
    }
    Ok(())
}

pub(crate) fn run(args: CertArgs) -> ExitCode {
    match make(&args) {
        Ok(()) => {
            let dir = args.out.display();
            println!(
                "wrote {dir}/ca.pem, {dir}/cert.pem and {dir}/key.pem (for {})",
                args.hosts.join(", ")
            );
            println!("server: [tls] cert = \"{dir}/cert.pem\", key = \"{dir}/key.pem\"");
            println!("clients: --ca-file {dir}/ca.pem with tls:// or wss:// addresses");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("whispeer: {err:#}");
            ExitCode::FAILURE
        }
    }
}
