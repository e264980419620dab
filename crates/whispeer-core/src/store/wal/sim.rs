//! A simulated disk for the tests: it keeps what a real disk would hold for sure (the durable
//! image) apart from what the running system sees, and can lose power, fail a sync, fill up,
//! or stop at its n-th operation.
//!
//! - Data written to a file is durable after `sync_data` of that file; directory entries
//!   (files created or removed) after `sync_dir`.
//! - [`SimDisk::power_loss`] returns the disk as it comes back: the durable image plus a random
//!   part of what was pending — for each file a prefix of its unsynced writes, the last one torn
//!   at a 512-byte sector boundary (and with a random choice, a file's length that grew covers
//!   the lost part, which reads as zeroes; an overwrite keeps the old bytes there); for the
//!   directory a prefix of its unsynced changes, in order (a journaling file system commits them
//!   so). The old disk fails every later operation.
//! - [`SimDisk::stop_at`] makes the n-th operation and all after it fail, as if the power went
//!   there; [`SimDisk::fail_syncs`] makes syncs fail with `EIO`; [`SimDisk::capacity`] makes
//!   writes that grow the files past a size fail with "no space".

use std::collections::BTreeMap;
use std::io::{self, Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::disk::{Disk, DiskFile, SyncFile};

const SECTOR: usize = 512;

/// An unsynced change of the directory.
#[derive(Clone, Debug)]
enum DirOp {
    Link(PathBuf, u64),
    Unlink(PathBuf),
}

/// An unsynced change of a file's data.
#[derive(Clone, Debug)]
enum FileOp {
    /// Bytes written at a position.
    Write(usize, Vec<u8>),
    Truncate(usize),
}

#[derive(Clone, Debug, Default)]
struct File {
    durable: Vec<u8>,
    pending: Vec<FileOp>,
    current: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    files: BTreeMap<u64, File>,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    dir_pending: Vec<DirOp>,
    next_inode: u64,
    ops: u64,
    stop_at: Option<u64>,
    fail_at: Option<(u64, io::ErrorKind)>,
    off: bool,
    /// When the power went.
    off_since: Option<Instant>,
    fail_syncs: bool,
    capacity: Option<usize>,
    /// Writes to files so far.
    writes: u64,
    locked: bool,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct SimDisk {
    state: Mutex<State>,
    /// Syncs held back (a slow disk), and how many wait.
    gate: Mutex<Gate>,
    opened: Condvar,
}

#[derive(Debug, Default)]
struct Gate {
    held: bool,
    waiting: usize,
}

fn error(kind: io::ErrorKind, what: &str) -> io::Error {
    io::Error::new(kind, format!("simulated disk: {what}"))
}

fn apply(names: &mut BTreeMap<PathBuf, u64>, op: &DirOp) {
    match op {
        DirOp::Link(path, inode) => {
            names.insert(path.clone(), *inode);
        }
        DirOp::Unlink(path) => {
            names.remove(path);
        }
    }
}

fn apply_file(data: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::Write(at, bytes) => write_at(data, *at, bytes),
        FileOp::Truncate(len) => data.truncate(*len),
    }
}

/// `bytes` written at `at` of `data`, which grows (with zeroes up to `at`) as needed.
fn write_at(data: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    let end = at + bytes.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[at..end].copy_from_slice(bytes);
}

impl SimDisk {
    /// An empty disk.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts an operation; fails once the power is off or the stop is reached.
    fn op(&self) -> io::Result<MutexGuard<'_, State>> {
        let mut state = self.state();
        if state.stop_at.is_some_and(|at| state.ops >= at) && !state.off {
            state.off = true;
            state.off_since = Some(Instant::now());
        }
        let n = state.ops;
        state.ops += 1;
        if state.off {
            return Err(error(io::ErrorKind::Other, "the power is off"));
        }
        if let Some((at, kind)) = state.fail_at
            && n >= at
        {
            state.fail_at = None;
            return Err(error(kind, "the operation failed"));
        }
        Ok(state)
    }

    /// Operations so far (failed ones included).
    pub(crate) fn ops(&self) -> u64 {
        self.state().ops
    }

    /// Operation `n` (counted from 0) and every one after it fail: the power goes there.
    pub(crate) fn stop_at(&self, n: u64) {
        self.state().stop_at = Some(n);
    }

    /// The first operation from `n` on (counted from 0) fails once with `kind`; the disk works
    /// on after it. `u64::MAX` disarms it.
    pub(crate) fn fail_at(&self, n: u64, kind: io::ErrorKind) {
        self.state().fail_at = Some((n, kind));
    }

    /// When the power went, if it did.
    pub(crate) fn off_since(&self) -> Option<Instant> {
        self.state().off_since
    }

    /// Holds every sync back until `hold_syncs(false)`: a disk whose cache takes its time.
    pub(crate) fn hold_syncs(&self, held: bool) {
        self.gate.lock().unwrap_or_else(PoisonError::into_inner).held = held;
        self.opened.notify_all();
    }

    /// Syncs waiting behind `hold_syncs`.
    pub(crate) fn syncs_waiting(&self) -> usize {
        self.gate.lock().unwrap_or_else(PoisonError::into_inner).waiting
    }

    /// Writes to files so far.
    pub(crate) fn writes(&self) -> u64 {
        self.state().writes
    }

    /// Waits while syncs are held.
    fn pass_gate(&self) {
        let mut gate = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        gate.waiting += 1;
        while gate.held {
            gate = self.opened.wait(gate).unwrap_or_else(PoisonError::into_inner);
        }
        gate.waiting -= 1;
    }

    /// Whether syncs fail with `EIO` (what they had pending stays pending).
    pub(crate) fn fail_syncs(&self, fail: bool) {
        self.state().fail_syncs = fail;
    }

    /// Appends fail with "no space" once the files would hold more than `bytes` (`None`: no
    /// limit).
    pub(crate) fn capacity(&self, bytes: Option<usize>) {
        self.state().capacity = bytes;
    }

    /// The power goes now: this disk fails every later operation, and the returned one is what
    /// comes back (see the module documentation), with the unsynced parts chosen by `seed`.
    pub(crate) fn power_loss(&self, seed: u64) -> Arc<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut state = self.state();
        state.off = true;
        state.off_since.get_or_insert_with(Instant::now);
        let mut names = state.durable_names.clone();
        let landed = rng.random_range(0..=state.dir_pending.len());
        for op in &state.dir_pending[..landed] {
            apply(&mut names, op);
        }
        let mut files = BTreeMap::new();
        for inode in names.values() {
            let Some(file) = state.files.get(inode) else { continue };
            let mut data = file.durable.clone();
            let landed = rng.random_range(0..=file.pending.len());
            for op in &file.pending[..landed] {
                apply_file(&mut data, op);
            }
            if let Some(FileOp::Write(at, bytes)) = file.pending.get(landed) {
                // The next write, torn at a sector boundary of the file.
                let end = at + bytes.len();
                let boundaries = (at / SECTOR + 1..=end / SECTOR).map(|s| s * SECTOR);
                let cuts: Vec<usize> = boundaries.filter(|&cut| cut < end).collect();
                if !cuts.is_empty() && rng.random_bool(0.5) {
                    let cut = cuts[rng.random_range(0..cuts.len())];
                    write_at(&mut data, *at, &bytes[..cut - at]);
                    if rng.random_bool(0.5) && data.len() < end {
                        data.resize(end, 0);
                    }
                }
            }
            let file = File { durable: data.clone(), pending: Vec::new(), current: data };
            files.insert(*inode, file);
        }
        let next_inode = state.next_inode;
        let state =
            State { files, durable_names: names.clone(), names, next_inode, ..State::default() };
        Arc::new(Self { state: Mutex::new(state), ..Self::default() })
    }

    /// The file at `path` as the running system sees it.
    pub(crate) fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.state();
        let inode = state.names.get(path)?;
        Some(state.files.get(inode)?.current.clone())
    }

    /// Replaces the contents of `path` (synced at once): damage for the tests.
    pub(crate) fn overwrite(&self, path: &Path, data: Vec<u8>) {
        let mut state = self.state();
        if let Some(inode) = state.names.get(path).copied()
            && let Some(file) = state.files.get_mut(&inode)
        {
            *file = File { durable: data.clone(), pending: Vec::new(), current: data };
        }
    }
}

impl Disk for Arc<SimDisk> {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        self.op().map(drop)
    }

    fn lock(&self, _dir: &Path) -> io::Result<Box<dyn Send + Sync>> {
        let mut state = self.op()?;
        if state.locked {
            return Err(error(io::ErrorKind::WouldBlock, "the log is in use"));
        }
        state.locked = true;
        Ok(Box::new(Unlock(Self::clone(self))))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<(PathBuf, u64)>> {
        let state = self.op()?;
        let in_dir = state.names.iter().filter(|(path, _)| path.parent() == Some(dir));
        let len = |inode: &u64| state.files.get(inode).map_or(0, |f| f.current.len() as u64);
        Ok(in_dir.map(|(path, inode)| (path.clone(), len(inode))).collect())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>> {
        let mut state = self.op()?;
        let inode = match state.names.get(path) {
            Some(inode) => *inode,
            None if create => {
                let inode = state.next_inode;
                state.next_inode += 1;
                state.files.insert(inode, File::default());
                state.names.insert(path.to_path_buf(), inode);
                state.dir_pending.push(DirOp::Link(path.to_path_buf(), inode));
                inode
            }
            None => return Err(error(io::ErrorKind::NotFound, "no such file")),
        };
        Ok(Box::new(SimFile { disk: Self::clone(self), inode }))
    }

    fn read(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
        let state = self.op()?;
        let inode =
            state.names.get(path).ok_or_else(|| error(io::ErrorKind::NotFound, "no such file"))?;
        let data = state.files.get(inode).map(|f| f.current.clone()).unwrap_or_default();
        Ok(Box::new(Cursor::new(data)))
    }

    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut state = self.op()?;
        let inode =
            *state.names.get(path).ok_or_else(|| error(io::ErrorKind::NotFound, "no such file"))?;
        let fail = state.fail_syncs;
        let file = state.files.entry(inode).or_default();
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        file.current.truncate(len);
        file.pending.push(FileOp::Truncate(len));
        if fail {
            return Err(error(io::ErrorKind::Other, "sync failed (EIO)"));
        }
        file.durable = file.current.clone();
        file.pending.clear();
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut state = self.op()?;
        if state.names.remove(path).is_none() {
            return Err(error(io::ErrorKind::NotFound, "no such file"));
        }
        state.dir_pending.push(DirOp::Unlink(path.to_path_buf()));
        Ok(())
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        let mut state = self.op()?;
        if state.fail_syncs {
            return Err(error(io::ErrorKind::Other, "sync failed (EIO)"));
        }
        let pending = std::mem::take(&mut state.dir_pending);
        for op in &pending {
            apply(&mut state.durable_names, op);
        }
        Ok(())
    }
}

/// Releases the log's lock.
struct Unlock(Arc<SimDisk>);

impl Drop for Unlock {
    fn drop(&mut self) {
        self.0.state().locked = false;
    }
}

#[derive(Clone)]
struct SimFile {
    disk: Arc<SimDisk>,
    inode: u64,
}

impl SyncFile for SimFile {
    fn sync_data(&self) -> io::Result<()> {
        self.disk.pass_gate();
        let mut state = self.disk.op()?;
        if state.fail_syncs {
            return Err(error(io::ErrorKind::Other, "sync failed (EIO)"));
        }
        let file = state.files.entry(self.inode).or_default();
        file.durable = file.current.clone();
        file.pending.clear();
        Ok(())
    }
}

impl DiskFile for SimFile {
    fn write_at(&mut self, bytes: &[u8], at: u64) -> io::Result<()> {
        let mut state = self.disk.op()?;
        let at = usize::try_from(at).map_err(io::Error::other)?;
        let used: usize = state.files.values().map(|f| f.current.len()).sum();
        let len = state.files.get(&self.inode).map_or(0, |f| f.current.len());
        let grows = (at + bytes.len()).saturating_sub(len);
        if state.capacity.is_some_and(|cap| used + grows > cap) {
            return Err(error(io::ErrorKind::StorageFull, "no space left"));
        }
        state.writes += 1;
        let file = state.files.entry(self.inode).or_default();
        write_at(&mut file.current, at, bytes);
        file.pending.push(FileOp::Write(at, bytes.to_vec()));
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        SyncFile::sync_data(self)
    }

    fn syncer(&self) -> io::Result<Arc<dyn SyncFile>> {
        Ok(Arc::new(self.clone()))
    }
}
