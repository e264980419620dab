//! A TCP proxy for tests, in front of a server: a fault that applies to every connection it
//! carries (delay, slices, pause), and resets or black holes on demand. Shared by the SDK's
//! network-fault tests and the cluster's (between a node and its engine).

#![allow(dead_code, reason = "each test crate uses part of the proxy")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::sleep;

/// What the proxy does to the bytes it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Carries them as they come.
    Pass,
    /// Holds each piece this long first.
    Delay(Duration),
    /// Writes them a few bytes at a time.
    Slice,
    /// Holds them until the fault changes (the peers see silence, then everything).
    Pause,
}

/// One carried connection: its two pumps, and whether its route is dead (everything dropped).
struct Link {
    pumps: [JoinHandle<()>; 2],
    holed: Arc<AtomicBool>,
}

/// A TCP proxy in front of the server, with a fault that applies to every connection.
pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    /// Every connection, to reset or black-hole them.
    links: Arc<Mutex<Vec<Link>>>,
    accepted: Arc<AtomicU64>,
    _accept: JoinHandle<()>,
}

impl Proxy {
    pub(crate) async fn start(server: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fault = Arc::new(Mutex::new(Fault::Pass));
        let links: Arc<Mutex<Vec<Link>>> = Arc::default();
        let accepted = Arc::new(AtomicU64::new(0));
        let (f, l, a) = (Arc::clone(&fault), Arc::clone(&links), Arc::clone(&accepted));
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(server).await else { continue };
                let n = a.fetch_add(1, Ordering::Relaxed);
                for stream in [&inbound, &outbound] {
                    // Dropped sockets reset (RST) rather than close.
                    #[expect(deprecated, reason = "a zero linger resets at once, never blocks")]
                    stream.set_linger(Some(Duration::ZERO)).unwrap();
                    stream.set_nodelay(true).unwrap();
                }
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                let holed = Arc::new(AtomicBool::new(false));
                let carry = |n| (Arc::clone(&f), Arc::clone(&holed), n);
                let up = tokio::spawn(pump(in_read, out_write, carry(n * 2)));
                let down = tokio::spawn(pump(out_read, in_write, carry(n * 2 + 1)));
                let mut links = l.lock().unwrap();
                links.retain(|link| link.pumps.iter().any(|pump| !pump.is_finished()));
                links.push(Link { pumps: [up, down], holed });
            }
        });
        Self { addr, fault, links, accepted, _accept: accept }
    }

    pub(crate) fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    /// Resets every connection it carries (both sides get an RST).
    pub(crate) fn reset_all(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.pumps.iter().for_each(JoinHandle::abort);
        }
    }

    /// Every connection it carries now drops all it gets from then on, without a word to
    /// either side (a dead route); new connections pass.
    pub(crate) fn black_hole_all(&self) {
        for link in self.links.lock().unwrap().iter() {
            link.holed.store(true, Ordering::Relaxed);
        }
    }

    pub(crate) fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

type Carry = (Arc<Mutex<Fault>>, Arc<AtomicBool>, u64);

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, (fault, holed, seed): Carry) {
    let mut buf = vec![0u8; 64 << 10];
    let mut rng = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let current = loop {
            let current = *fault.lock().unwrap();
            if current != Fault::Pause {
                break current;
            }
            sleep(Duration::from_millis(5)).await;
        };
        if holed.load(Ordering::Relaxed) {
            continue;
        }
        let written = match current {
            Fault::Delay(by) => {
                sleep(by).await;
                to.write_all(&buf[..n]).await
            }
            Fault::Slice => {
                let mut at = 0;
                let mut result = Ok(());
                while at < n && result.is_ok() {
                    rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let piece = 1 + (rng >> 61) as usize;
                    let end = (at + piece).min(n);
                    result = to.write_all(&buf[at..end]).await;
                    at = end;
                }
                result
            }
            _ => to.write_all(&buf[..n]).await,
        };
        if written.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A round of faults played in turn, each for its milliseconds; after some steps every
/// connection is reset or black-holed.
pub(crate) struct Script {
    pub(crate) steps: Vec<(Fault, u64)>,
    /// After which step every connection is reset.
    pub(crate) reset_after: usize,
    /// After which step every connection is black-holed.
    pub(crate) hole_after: usize,
    next: usize,
    /// Resets and black holes done so far.
    pub(crate) resets: u32,
    pub(crate) holes: u32,
}

impl Script {
    pub(crate) fn new(steps: Vec<(Fault, u64)>, reset_after: usize, hole_after: usize) -> Self {
        Self { steps, reset_after, hole_after, next: 0, resets: 0, holes: 0 }
    }

    /// Plays the next step on `proxy`.
    pub(crate) async fn step(&mut self, proxy: &Proxy) {
        let at = self.next % self.steps.len();
        let (fault, millis) = self.steps[at];
        proxy.set(fault);
        sleep(Duration::from_millis(millis)).await;
        if at == self.reset_after {
            proxy.reset_all();
            self.resets += 1;
        }
        if at == self.hole_after {
            proxy.black_hole_all();
            self.holes += 1;
        }
        self.next += 1;
    }
}
