//! `whispeer keys`: end-to-end keys for pub/sub from the command line — publish this device's
//! identity to the server's directory, list a principal's devices and fingerprints, make or
//! change a key policy, and publish or read messages sealed under one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use whispeer_client::engines::Identity;
use whispeer_client::{Client, KeyPolicy};

use crate::ConnectArgs;
use crate::pubsub::{block_on, connect};

/// `whispeer keys`.
#[derive(Debug, Args)]
pub(crate) struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

/// Who this device is: a principal (the API key's), a device name and an identity file.
#[derive(Debug, Args)]
struct Me {
    /// The principal this device belongs to (the API key's name on a server with keys).
    #[arg(long = "as", value_name = "PRINCIPAL")]
    principal: String,
    /// This device's name in the directory.
    #[arg(long, default_value = "default")]
    device: String,
    /// This device's identity file, made on first use (readable by its owner only).
    #[arg(long, value_name = "FILE")]
    identity: PathBuf,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Publish this device's public identity to the server's directory (`@keys/<as>/<device>`),
    /// and print its fingerprint.
    Publish {
        #[command(flatten)]
        me: Me,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// List a principal's devices in the directory with their fingerprints.
    Show {
        /// The principal.
        principal: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Make or change key policy NAME (owned by --as): its filter and members, a new epoch's
    /// key sealed to every member's devices.
    Policy {
        /// The policy's name.
        name: String,
        /// The topics it covers.
        #[arg(long)]
        filter: String,
        /// A member (repeat for each); the owner always belongs.
        #[arg(long = "member", value_name = "PRINCIPAL")]
        members: Vec<String>,
        #[command(flatten)]
        me: Me,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Publish MESSAGE on TOPIC sealed under policy OWNER/NAME.
    Pub {
        /// The policy, as `owner/name`.
        policy: String,
        /// The topic, inside the policy's filter.
        topic: String,
        /// The message.
        message: String,
        #[command(flatten)]
        me: Me,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Print the messages on FILTER sealed under policy OWNER/NAME, opened (one per line;
    /// `!` and why for one that does not open on this device). The policy's keys this device
    /// opens are kept beside the identity file (`<identity>.<owner>.<name>.keys`).
    Sub {
        /// The policy, as `owner/name`.
        policy: String,
        /// The filter to subscribe to.
        filter: String,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
        #[command(flatten)]
        me: Me,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Remove one of this principal's devices from the directory (a lost or retired one):
    /// policies changed afterwards leave it out. Change each policy it was in (`policy` again)
    /// to make a key it does not get.
    Revoke {
        /// The device.
        device: String,
        /// The principal it belongs to.
        #[arg(long = "as", value_name = "PRINCIPAL")]
        principal: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Trust the changed device keys of policy OWNER/NAME's owner, after comparing their
    /// fingerprints with the owner (`whispeer keys show OWNER`): the changes `pub` and `sub`
    /// report.
    Trust {
        /// The policy, as `owner/name`.
        policy: String,
        #[command(flatten)]
        me: Me,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

impl KeysCommand {
    fn connect(&self) -> &ConnectArgs {
        match self {
            Self::Publish { connect, .. }
            | Self::Show { connect, .. }
            | Self::Policy { connect, .. }
            | Self::Pub { connect, .. }
            | Self::Sub { connect, .. }
            | Self::Revoke { connect, .. }
            | Self::Trust { connect, .. } => connect,
        }
    }
}

/// Reads the identity in `path`, or makes one there.
fn identity(path: &Path) -> anyhow::Result<Arc<Identity>> {
    if path.exists() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("identity file {}", path.display()))?;
        return Ok(Arc::new(Identity::from_text(text.trim()).context("identity file")?));
    }
    let made = Identity::generate().context("identity")?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file =
        options.open(path).with_context(|| format!("identity file {}", path.display()))?;
    std::io::Write::write_all(&mut file, made.to_text().as_bytes())?;
    Ok(Arc::new(made))
}

fn split_policy(policy: &str) -> anyhow::Result<(&str, &str)> {
    policy.split_once('/').with_context(|| format!("policy {policy:?}: give it as owner/name"))
}

/// Where a device keeps the keys of policy `owner/name`: beside its identity file.
fn keys_file(me: &Me, owner: &str, name: &str) -> PathBuf {
    PathBuf::from(format!("{}.{owner}.{name}.keys", me.identity.display()))
}

/// Follows policy `owner/name` with the keys and the owner's device keys kept beside the
/// identity file; says on standard error which of the owner's keys changed.
async fn follow(
    client: &Client,
    identity: Arc<Identity>,
    me: &Me,
    owner: &str,
    name: &str,
) -> anyhow::Result<KeyPolicy> {
    let policy =
        KeyPolicy::follow_kept(client, identity, owner, name, keys_file(me, owner, name)).await?;
    report_changes(&policy, owner, name);
    Ok(policy)
}

fn report_changes(policy: &KeyPolicy, owner: &str, name: &str) {
    for change in policy.changes() {
        eprintln!(
            "whispeer: {owner}'s key for device {} changed: was {}, now {}. Compare the \
             fingerprint with {owner}, then `whispeer keys trust {owner}/{name}`",
            change.device, change.was, change.now
        );
    }
}

/// A connected device: publishes its identity first, so members can seal to it.
async fn device(client: &Client, me: &Me) -> anyhow::Result<Arc<Identity>> {
    let identity = identity(&me.identity)?;
    client.publish_identity(&me.principal, &me.device, &identity).await?;
    Ok(identity)
}

pub(crate) fn run(args: KeysArgs) -> ExitCode {
    block_on(async move {
        let client = connect(args.command.connect()).await?;
        match args.command {
            KeysCommand::Publish { me, .. } => {
                let identity = device(&client, &me).await?;
                println!("{} {}", me.device, identity.public(&me.device).fingerprint());
            }
            KeysCommand::Show { principal, .. } => {
                for public in client.identities(&principal).await? {
                    println!("{} {}", public.device, public.fingerprint());
                }
            }
            KeysCommand::Policy { name, filter, members, me, .. } => {
                let identity = device(&client, &me).await?;
                let members: Vec<&str> = members.iter().map(String::as_str).collect();
                let policy =
                    KeyPolicy::create(&client, identity, &me.principal, &name, &filter, &members)
                        .await?;
                policy.save_keys_in(keys_file(&me, &me.principal, &name))?;
                if let Some((filter, members, epoch)) = policy.state() {
                    println!(
                        "{}/{name} {filter} epoch {epoch}: {}",
                        me.principal,
                        members.join(" ")
                    );
                }
            }
            KeysCommand::Pub { policy, topic, message, me, .. } => {
                let (owner, name) = split_policy(&policy)?;
                let identity = device(&client, &me).await?;
                let policy = follow(&client, identity, &me, owner, name).await?;
                policy.publish_bytes(&topic, message.as_bytes()).await?;
            }
            KeysCommand::Sub { policy, filter, count, me, .. } => {
                let (owner, name) = split_policy(&policy)?;
                let identity = device(&client, &me).await?;
                let policy = follow(&client, identity, &me, owner, name).await?;
                let mut sub = client.messages(filter.as_str()).await?;
                eprintln!("whispeer: reading {filter} under {owner}/{name}");
                let mut seen = 0;
                while count.is_none_or(|count| seen < count) {
                    let Some(delivery) = sub.recv().await else { break };
                    seen += 1;
                    match policy.open(&delivery).await {
                        Ok((plain, _)) => println!("{}", String::from_utf8_lossy(&plain)),
                        Err(err) => println!("! {}: {err}", delivery.topic()),
                    }
                }
            }
            KeysCommand::Revoke { device, principal, .. } => {
                client.revoke_identity(&principal, &device).await?;
                println!("{principal}/{device} removed from the directory");
            }
            KeysCommand::Trust { policy, me, .. } => {
                let (owner, name) = split_policy(&policy)?;
                let identity = device(&client, &me).await?;
                let policy = follow(&client, identity, &me, owner, name).await?;
                let trusted = policy.trust_owner();
                println!("{trusted} changed key(s) of {owner} trusted");
            }
        }
        client.close().await;
        Ok(())
    })
}
