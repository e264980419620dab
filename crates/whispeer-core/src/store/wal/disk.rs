//! The file operations of the write-ahead log, behind one seam: the operating system's in
//! production, and in the tests a simulated disk that can lose power, fail a sync or fill up
//! (`sim.rs`). Every operation the log does on files goes through [`Disk`], so what a test
//! proves about the log on the simulated disk holds for the code that runs in production.
//!
//! The contract is POSIX's, taken strictly: data written is durable only after `sync_data` of
//! its file, and a file created, renamed or removed is durable only after `sync_dir` of its
//! directory (created or removed).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What the log needs of a file system; see the module documentation.
pub(crate) trait Disk: Send + Sync + fmt::Debug {
    /// Creates `dir` and its parents if missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;

    /// Takes the exclusive lock of the log in `dir` (one broker per log), held while the
    /// returned guard lives. `WouldBlock` if another holds it.
    fn lock(&self, dir: &Path) -> io::Result<Box<dyn Send + Sync>>;

    /// The files in `dir`, with their lengths.
    fn list(&self, dir: &Path) -> io::Result<Vec<(PathBuf, u64)>>;

    /// Opens `path` for writing; creates it first if `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>>;

    /// Reads `path` from its start.
    fn read(&self, path: &Path) -> io::Result<Box<dyn Read + Send>>;

    /// Cuts `path` to `len` bytes and syncs it.
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()>;

    /// Removes `path`.
    fn remove(&self, path: &Path) -> io::Result<()>;

    /// Forces the entries of `dir` (files created or removed) to disk.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// A file open for writing.
pub(crate) trait DiskFile: Send {
    /// Writes all of `bytes` at `at`; a file shorter than `at` is first extended with zeroes.
    /// What follows `bytes` up to the next 4 KiB boundary may be written with zeroes too (the
    /// file then grows to that boundary): direct writes go in whole blocks (`direct.rs`), and
    /// the log never writes in front of bytes it still needs.
    fn write_at(&mut self, bytes: &[u8], at: u64) -> io::Result<()>;

    /// Forces what was written to disk (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;

    /// A handle that syncs this file from another thread while this one writes it: it
    /// forces to disk every write that returned before its sync began.
    fn syncer(&self) -> io::Result<Arc<dyn SyncFile>>;
}

/// Syncs a file that another thread writes ([`DiskFile::syncer`]).
pub(crate) trait SyncFile: Send + Sync {
    /// Forces what was written to disk (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
}

impl SyncFile for File {
    fn sync_data(&self) -> io::Result<()> {
        Self::sync_data(self)
    }
}

/// The operating system's file system.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct OsDisk;

impl Disk for OsDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn lock(&self, dir: &Path) -> io::Result<Box<dyn Send + Sync>> {
        let lock = File::create(dir.join("LOCK"))?;
        if let Err(err) = lock.try_lock() {
            let message = format!("the log is in use by another broker ({err})");
            return Err(io::Error::new(io::ErrorKind::WouldBlock, message));
        }
        Ok(Box::new(lock))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<(PathBuf, u64)>> {
        let mut files = Vec::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let len = fs::metadata(&path)?.len();
            files.push((path, len));
        }
        Ok(files)
    }

    #[cfg(target_os = "linux")]
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>> {
        // Around the page cache, still synced with `fdatasync` (`direct.rs`).
        Ok(Box::new(super::direct::DirectFile::open(path, create)?))
    }

    #[cfg(not(target_os = "linux"))]
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>> {
        Ok(Box::new(OpenOptions::new().create(create).write(true).truncate(false).open(path)?))
    }

    fn read(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(BufReader::new(File::open(path)?)))
    }

    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(len)?;
        file.sync_all()
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

impl DiskFile for File {
    #[cfg(unix)]
    fn write_at(&mut self, bytes: &[u8], at: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, bytes, at)
    }

    #[cfg(not(unix))]
    fn write_at(&mut self, bytes: &[u8], at: u64) -> io::Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        self.seek(SeekFrom::Start(at))?;
        self.write_all(bytes)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        Self::sync_data(self)
    }

    fn syncer(&self) -> io::Result<Arc<dyn SyncFile>> {
        Ok(Arc::new(self.try_clone()?))
    }
}
