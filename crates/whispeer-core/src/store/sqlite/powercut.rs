//! A power cut under SQLite, simulated (tests only): a VFS that passes every call to the
//! platform's own and, for the files of a watched directory, keeps what a power cut would keep
//! — each file's image as of its last sync, and the writes, truncations and deletions since.
//! [`PowerCut::power_loss`] writes what a disk could hold after the power went: per file, the
//! synced image plus a random prefix of what followed, the next write torn at a 512-byte sector;
//! a file never synced (its directory entry never made durable) kept or dropped, and a deletion
//! not synced undone or not. [`PowerCut::stop_at`] cuts the power at an operation: from there
//! on, writes, truncations, syncs and deletions fail, as on a machine that went dark.
//!
//! The shared-memory index (`-shm`) passes through unrecorded: SQLite rebuilds it from the
//! write-ahead log after a crash, and it is never part of what the disk keeps.

#![allow(unsafe_code)] // A VFS is a table of C callbacks; nothing else here is unsafe.

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::ffi;

/// The VFS's name, for `Connection::open_with_flags_and_vfs`.
pub(crate) const NAME: &CStr = c"whispeer-powercut";
const SECTOR: usize = 512;
/// A handle of a file outside every watched directory.
const UNWATCHED: usize = usize::MAX;

/// A change not yet synced.
enum Op {
    Write(u64, Vec<u8>),
    Truncate(u64),
}

/// One file of a watched directory.
#[derive(Default)]
struct FileLog {
    /// Its content as of its last sync; `None`: never synced.
    synced: Option<Vec<u8>>,
    pending: Vec<Op>,
}

/// A watched directory: its files, by name, and its operations counted.
#[derive(Default)]
struct Disk {
    files: HashMap<String, FileLog>,
    /// Files deleted without a directory sync: their synced image, which a cut may bring back.
    ghosts: HashMap<String, Vec<u8>>,
    ops: u64,
    stop_at: Option<u64>,
}

impl Disk {
    /// Counts an operation; false once the power is off.
    fn step(&mut self) -> bool {
        if self.stop_at.is_some_and(|stop| self.ops >= stop) {
            return false;
        }
        self.ops += 1;
        true
    }
}

#[derive(Default)]
struct State {
    disks: HashMap<PathBuf, Disk>,
    /// Open files: (directory, name), by handle.
    handles: Vec<Option<(PathBuf, String)>>,
}

fn state() -> MutexGuard<'static, State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(Mutex::default).lock().unwrap_or_else(PoisonError::into_inner)
}

/// A watched directory; forgotten when dropped.
pub(crate) struct PowerCut {
    dir: PathBuf,
}

impl PowerCut {
    /// Watches `dir` (created empty): SQLite files opened there through [`NAME`] are recorded.
    pub(crate) fn new(dir: &Path) -> Self {
        register();
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).expect("a test directory");
        state().disks.insert(dir.to_path_buf(), Disk::default());
        Self { dir: dir.to_path_buf() }
    }

    /// Operations so far.
    pub(crate) fn ops(&self) -> u64 {
        state().disks.get(&self.dir).map_or(0, |disk| disk.ops)
    }

    /// The power goes once `op` operations were done.
    pub(crate) fn stop_at(&self, op: u64) {
        if let Some(disk) = state().disks.get_mut(&self.dir) {
            disk.stop_at = Some(op);
        }
    }

    /// Writes into `into` (emptied first) what the disk could hold after the power went now.
    pub(crate) fn power_loss(&self, seed: u64, into: &Path) {
        let mut rng = StdRng::seed_from_u64(seed);
        let _ = std::fs::remove_dir_all(into);
        std::fs::create_dir_all(into).expect("a test directory");
        let state = state();
        let Some(disk) = state.disks.get(&self.dir) else { return };
        let mut names: Vec<&String> = disk.files.keys().chain(disk.ghosts.keys()).collect();
        names.sort();
        names.dedup();
        for name in names {
            let image = match disk.files.get(name) {
                Some(file) => match (&file.synced, rng.random_bool(0.5)) {
                    (Some(synced), _) => Some(cut(synced.clone(), &file.pending, &mut rng)),
                    // Never synced: its directory entry may not have reached the disk.
                    (None, true) => Some(cut(Vec::new(), &file.pending, &mut rng)),
                    (None, false) => None,
                },
                None => None,
            };
            let image = image.or_else(|| {
                let ghost = disk.ghosts.get(name)?;
                rng.random_bool(0.5).then(|| ghost.clone())
            });
            if let Some(image) = image {
                std::fs::write(into.join(name), image).expect("a test file");
            }
        }
    }
}

impl Drop for PowerCut {
    fn drop(&mut self) {
        state().disks.remove(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `synced` with a random prefix of `pending` applied, the next write torn at a sector.
fn cut(mut image: Vec<u8>, pending: &[Op], rng: &mut StdRng) -> Vec<u8> {
    let kept = rng.random_range(0..=pending.len());
    for op in &pending[..kept] {
        apply(&mut image, op);
    }
    if let Some(Op::Write(offset, bytes)) = pending.get(kept) {
        let sectors = bytes.len().div_ceil(SECTOR);
        let torn = rng.random_range(0..sectors.max(1));
        let part = (torn * SECTOR).min(bytes.len());
        apply(&mut image, &Op::Write(*offset, bytes[..part].to_vec()));
    }
    image
}

fn apply(image: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write(offset, bytes) => {
            let start = usize::try_from(*offset).unwrap_or(usize::MAX);
            let end = start.saturating_add(bytes.len());
            if image.len() < end {
                image.resize(end, 0);
            }
            image[start..end].copy_from_slice(bytes);
        }
        Op::Truncate(size) => image.resize(usize::try_from(*size).unwrap_or(usize::MAX), 0),
    }
}

/// Forwards a change to the watched file behind `handle` and records it (`op`) if it
/// succeeded; fails it with `SQLITE_IOERR` once the power is off.
fn recorded(
    handle: usize,
    forward: impl FnOnce() -> c_int,
    op: impl FnOnce(&mut FileLog),
) -> c_int {
    if handle == UNWATCHED {
        return forward();
    }
    let mut state = state();
    let Some(Some((dir, name))) = state.handles.get(handle).cloned() else { return forward() };
    let Some(disk) = state.disks.get_mut(&dir) else { return forward() };
    if !disk.step() {
        return ffi::SQLITE_IOERR;
    }
    let rc = forward();
    if rc == ffi::SQLITE_OK {
        op(disk.files.entry(name).or_default());
    }
    rc
}

/// A file as SQLite holds it: ours first, the platform's file right behind.
#[repr(C)]
struct CutFile {
    base: ffi::sqlite3_file,
    handle: usize,
    inner: *mut ffi::sqlite3_file,
}

/// The platform's file behind `file`.
unsafe fn inner(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    unsafe { (*file.cast::<CutFile>()).inner }
}

/// The platform's methods for `file`.
unsafe fn methods(file: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    unsafe { &*(*inner(file)).pMethods }
}

fn handle_of(file: *mut ffi::sqlite3_file) -> usize {
    unsafe { (*file.cast::<CutFile>()).handle }
}

/// The platform's VFS, kept in ours.
unsafe fn platform(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    unsafe { (*vfs).pAppData.cast() }
}

/// Whether `path` is in a watched directory.
pub(crate) fn is_watched(path: &Path) -> bool {
    path.to_str().and_then(watched).is_some()
}

/// Splits a path into a watched directory and a file name, if it is in one.
fn watched(path: &str) -> Option<(PathBuf, String)> {
    let path = Path::new(path);
    let dir = path.parent()?.to_path_buf();
    let name = path.file_name()?.to_str()?.to_string();
    state().disks.contains_key(&dir).then_some((dir, name))
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    unsafe {
        let cut = file.cast::<CutFile>();
        let behind = file.cast::<u8>().add(size_of::<CutFile>()).cast::<ffi::sqlite3_file>();
        (*cut).base.pMethods = ptr::null();
        (*cut).inner = behind;
        (*cut).handle = UNWATCHED;
        let platform = platform(vfs);
        let Some(x_open) = (*platform).xOpen else { return ffi::SQLITE_ERROR };
        let rc = x_open(platform, name, behind, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        let path = (!name.is_null()).then(|| CStr::from_ptr(name).to_str().ok()).flatten();
        if let Some((dir, file_name)) = path.and_then(watched) {
            let mut state = state();
            (*cut).handle = state.handles.len();
            state.handles.push(Some((dir, file_name)));
        }
        (*cut).base.pMethods = &METHODS;
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    let handle = handle_of(file);
    if handle != UNWATCHED
        && let Some(slot) = state().handles.get_mut(handle)
    {
        *slot = None;
    }
    unsafe { methods(file).xClose.map_or(ffi::SQLITE_OK, |f| f(inner(file))) }
}

unsafe extern "C" fn read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    n: c_int,
    at: i64,
) -> c_int {
    unsafe { methods(file).xRead.map_or(ffi::SQLITE_IOERR_READ, |f| f(inner(file), buf, n, at)) }
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    n: c_int,
    at: i64,
) -> c_int {
    let forward = || unsafe {
        methods(file).xWrite.map_or(ffi::SQLITE_IOERR_WRITE, |f| f(inner(file), buf, n, at))
    };
    recorded(handle_of(file), forward, |log| {
        let len = usize::try_from(n).unwrap_or(0);
        // SAFETY: SQLite hands `n` readable bytes at `buf`.
        let bytes = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) };
        log.pending.push(Op::Write(u64::try_from(at).unwrap_or(0), bytes.to_vec()));
    })
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    let forward = || unsafe {
        methods(file).xTruncate.map_or(ffi::SQLITE_IOERR_TRUNCATE, |f| f(inner(file), size))
    };
    recorded(handle_of(file), forward, |log| {
        log.pending.push(Op::Truncate(u64::try_from(size).unwrap_or(0)));
    })
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    let forward = || unsafe {
        methods(file).xSync.map_or(ffi::SQLITE_IOERR_FSYNC, |f| f(inner(file), flags))
    };
    recorded(handle_of(file), forward, |log| {
        let mut image = log.synced.take().unwrap_or_default();
        for op in log.pending.drain(..) {
            apply(&mut image, &op);
        }
        log.synced = Some(image);
    })
}

unsafe extern "C" fn file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    unsafe { methods(file).xFileSize.map_or(ffi::SQLITE_IOERR, |f| f(inner(file), size)) }
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe { methods(file).xLock.map_or(ffi::SQLITE_OK, |f| f(inner(file), level)) }
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe { methods(file).xUnlock.map_or(ffi::SQLITE_OK, |f| f(inner(file), level)) }
}

unsafe extern "C" fn check_reserved(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    unsafe { methods(file).xCheckReservedLock.map_or(ffi::SQLITE_OK, |f| f(inner(file), out)) }
}

unsafe extern "C" fn file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    unsafe { methods(file).xFileControl.map_or(ffi::SQLITE_NOTFOUND, |f| f(inner(file), op, arg)) }
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe { methods(file).xSectorSize.map_or(SECTOR as c_int, |f| f(inner(file))) }
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe { methods(file).xDeviceCharacteristics.map_or(0, |f| f(inner(file))) }
}

unsafe extern "C" fn shm_map(
    file: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    unsafe {
        methods(file)
            .xShmMap
            .map_or(ffi::SQLITE_IOERR_SHMMAP, |f| f(inner(file), page, size, extend, out))
    }
}

unsafe extern "C" fn shm_lock(
    file: *mut ffi::sqlite3_file,
    at: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    unsafe {
        methods(file).xShmLock.map_or(ffi::SQLITE_IOERR_SHMLOCK, |f| f(inner(file), at, n, flags))
    }
}

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    unsafe {
        if let Some(f) = methods(file).xShmBarrier {
            f(inner(file));
        }
    }
}

unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    unsafe { methods(file).xShmUnmap.map_or(ffi::SQLITE_OK, |f| f(inner(file), delete)) }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 2,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: None,
    xUnfetch: None,
};

unsafe extern "C" fn delete(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    unsafe {
        let platform = platform(vfs);
        let forward = || {
            (*platform).xDelete.map_or(ffi::SQLITE_IOERR_DELETE, |f| f(platform, name, sync_dir))
        };
        let path = (!name.is_null()).then(|| CStr::from_ptr(name).to_str().ok()).flatten();
        let Some((dir, file_name)) = path.and_then(watched) else { return forward() };
        let mut state = state();
        let Some(disk) = state.disks.get_mut(&dir) else { return forward() };
        if !disk.step() {
            return ffi::SQLITE_IOERR_DELETE;
        }
        let rc = forward();
        if rc == ffi::SQLITE_OK {
            let synced = disk.files.remove(&file_name).and_then(|file| file.synced);
            match synced {
                Some(image) if sync_dir == 0 => {
                    disk.ghosts.insert(file_name, image);
                }
                _ => {
                    disk.ghosts.remove(&file_name);
                }
            }
        }
        rc
    }
}

unsafe extern "C" fn access(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    unsafe {
        let platform = platform(vfs);
        (*platform).xAccess.map_or(ffi::SQLITE_IOERR_ACCESS, |f| f(platform, name, flags, out))
    }
}

unsafe extern "C" fn full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    unsafe {
        let platform = platform(vfs);
        (*platform).xFullPathname.map_or(ffi::SQLITE_ERROR, |f| f(platform, name, n, out))
    }
}

unsafe extern "C" fn randomness(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    unsafe {
        let platform = platform(vfs);
        (*platform).xRandomness.map_or(0, |f| f(platform, n, out))
    }
}

unsafe extern "C" fn sleep(vfs: *mut ffi::sqlite3_vfs, micros: c_int) -> c_int {
    unsafe {
        let platform = platform(vfs);
        (*platform).xSleep.map_or(0, |f| f(platform, micros))
    }
}

unsafe extern "C" fn current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    unsafe {
        let platform = platform(vfs);
        (*platform).xCurrentTime.map_or(ffi::SQLITE_ERROR, |f| f(platform, out))
    }
}

unsafe extern "C" fn last_error(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    unsafe {
        let platform = platform(vfs);
        (*platform).xGetLastError.map_or(0, |f| f(platform, n, out))
    }
}

unsafe extern "C" fn current_time_int64(vfs: *mut ffi::sqlite3_vfs, out: *mut i64) -> c_int {
    unsafe {
        let platform = platform(vfs);
        (*platform).xCurrentTimeInt64.map_or(ffi::SQLITE_ERROR, |f| f(platform, out))
    }
}

/// Registers the VFS once, beside the platform's (which stays the default).
fn register() {
    static REGISTERED: OnceLock<()> = OnceLock::new();
    REGISTERED.get_or_init(|| unsafe {
        let platform = ffi::sqlite3_vfs_find(ptr::null());
        assert!(!platform.is_null(), "SQLite has a default VFS");
        let size = c_int::try_from(size_of::<CutFile>()).unwrap_or(c_int::MAX);
        let vfs = Box::leak(Box::new(ffi::sqlite3_vfs {
            iVersion: 2,
            szOsFile: size + (*platform).szOsFile,
            mxPathname: (*platform).mxPathname,
            pNext: ptr::null_mut(),
            zName: NAME.as_ptr(),
            pAppData: platform.cast(),
            xOpen: Some(open),
            xDelete: Some(delete),
            xAccess: Some(access),
            xFullPathname: Some(full_pathname),
            xDlOpen: None,
            xDlError: None,
            xDlSym: None,
            xDlClose: None,
            xRandomness: Some(randomness),
            xSleep: Some(sleep),
            xCurrentTime: Some(current_time),
            xGetLastError: Some(last_error),
            xCurrentTimeInt64: Some(current_time_int64),
            xSetSystemCall: None,
            xGetSystemCall: None,
            xNextSystemCall: None,
        }));
        let rc = ffi::sqlite3_vfs_register(vfs, 0);
        assert_eq!(rc, ffi::SQLITE_OK, "the power-cut VFS registers");
    });
}
