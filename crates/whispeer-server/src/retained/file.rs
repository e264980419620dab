//! `retained.log` in the store's directory: the retained messages of durable topics, kept
//! across restarts. Each record is one envelope (a native PUBLISH frame's bytes) behind its
//! length and CRC-32C, appended and synced to disk before the publish is acknowledged; the
//! last record of a topic wins, and one with an empty payload clears the topic. Opening reads
//! every whole record, stops at the first torn or damaged one (a crash mid-append), and writes
//! the file again with one record per live topic (a new file, synced, renamed over the old, the
//! directory synced), as it does when the file has grown to several times what it keeps.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::{Buf, BufMut, BytesMut};
use whispeer_proto::{Body, Envelope, Frame, Limits, Qos};

const NAME: &str = "retained.log";
/// Length and CRC-32C before each record.
const HEAD: usize = 8;
/// The file is written again once it holds this much beyond four times what it keeps.
const SLACK: u64 = 16 << 20;

/// The open file.
#[derive(Debug)]
pub(crate) struct RetainedFile {
    dir: PathBuf,
    file: File,
    len: u64,
}

fn record(envelope: &Envelope, out: &mut BytesMut) -> io::Result<()> {
    let frame = Frame::new(0, Body::Publish { qos: Qos::AtMostOnce, envelope: envelope.clone() });
    let mut bytes = BytesMut::new();
    frame.encode(&mut bytes, usize::MAX >> 1).map_err(io::Error::other)?;
    let len = u32::try_from(bytes.len()).map_err(|_| io::Error::other("record too large"))?;
    out.put_u32_le(len);
    out.put_u32_le(crc32c::crc32c(&bytes));
    out.put_slice(&bytes);
    Ok(())
}

/// The records of `data`, in order, up to the first torn or damaged one; and where that is.
fn records(data: &[u8], limits: &Limits) -> (Vec<Envelope>, usize) {
    let mut envelopes = Vec::new();
    let mut at = 0;
    while data.len() - at >= HEAD {
        let mut head = &data[at..at + HEAD];
        let (len, crc) = (head.get_u32_le() as usize, head.get_u32_le());
        let Some(body) = data.get(at + HEAD..at + HEAD + len) else { break };
        if crc32c::crc32c(body) != crc {
            break;
        }
        let mut buf = BytesMut::from(body);
        match Frame::decode(&mut buf, limits) {
            Ok(Some(Frame { body: Body::Publish { envelope, .. }, .. })) if buf.is_empty() => {
                envelopes.push(envelope);
            }
            _ => break,
        }
        at += HEAD + len;
    }
    (envelopes, at)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl RetainedFile {
    /// Opens (or creates) `dir/retained.log` and gives the retained message of each topic in
    /// it; the file is written again with those alone.
    pub(crate) fn open(
        dir: &Path,
        limits: Limits,
    ) -> io::Result<(Self, HashMap<String, Envelope>)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(NAME);
        let mut data = Vec::new();
        match File::open(&path) {
            Ok(mut file) => {
                file.read_to_end(&mut data)?;
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        let (envelopes, read) = records(&data, &limits);
        if read < data.len() {
            tracing::warn!(
                path = %path.display(),
                kept = read,
                cut = data.len() - read,
                "retained.log: a torn or damaged tail was cut off"
            );
        }
        let mut topics = HashMap::new();
        for envelope in envelopes {
            let topic = envelope.topic.as_str().to_string();
            if envelope.payload.is_empty() {
                topics.remove(&topic);
            } else {
                topics.insert(topic, envelope);
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut this = Self { dir: dir.to_path_buf(), file, len: 0 };
        this.rewrite(topics.values())?;
        Ok((this, topics))
    }

    /// Appends `envelope` and syncs it to disk.
    pub(crate) fn append(&mut self, envelope: &Envelope) -> io::Result<()> {
        let mut out = BytesMut::new();
        record(envelope, &mut out)?;
        self.file.write_all(&out)?;
        self.file.sync_data()?;
        self.len += out.len() as u64;
        Ok(())
    }

    /// Whether the file holds enough beyond `live` bytes of payload to be written again.
    pub(crate) fn bloated(&self, live: usize) -> bool {
        self.len > SLACK + 4 * live as u64
    }

    /// Writes the file again with `live` alone: a new file, synced, then renamed over it.
    pub(crate) fn rewrite<'a>(
        &mut self,
        live: impl Iterator<Item = &'a Envelope>,
    ) -> io::Result<()> {
        let mut out = BytesMut::new();
        for envelope in live {
            record(envelope, &mut out)?;
        }
        let (path, next) = (self.dir.join(NAME), self.dir.join(format!("{NAME}.new")));
        let mut file = File::create(&next)?;
        file.write_all(&out)?;
        file.sync_all()?;
        std::fs::rename(&next, &path)?;
        sync_dir(&self.dir)?;
        self.file = OpenOptions::new().append(true).open(&path)?;
        self.len = out.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use whispeer_proto::{ContentType, Flags, MessageId, Topic};

    use super::*;

    fn message(topic: &str, payload: &'static str) -> Envelope {
        let topic = Topic::parse(topic).unwrap();
        let flags = Flags::with_content(ContentType::Raw);
        Envelope::new(MessageId(7), topic, 1, flags, Bytes::from(payload))
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("whispeer-retained-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_last_record_of_each_topic_survives_reopening_and_a_torn_tail_is_cut() {
        let dir = scratch("reopen");
        {
            let (mut file, topics) = RetainedFile::open(&dir, Limits::DEFAULT).unwrap();
            assert!(topics.is_empty());
            for (topic, payload) in [("a", "1"), ("b", "2"), ("a", "3"), ("b", ""), ("c", "4")] {
                file.append(&message(topic, payload)).unwrap();
            }
        }
        // A crash in the middle of an append: half a record at the end.
        let mut torn = BytesMut::new();
        record(&message("d", "lost"), &mut torn).unwrap();
        let mut raw = OpenOptions::new().append(true).open(dir.join(NAME)).unwrap();
        raw.write_all(&torn[..torn.len() / 2]).unwrap();
        drop(raw);
        let (_, topics) = RetainedFile::open(&dir, Limits::DEFAULT).unwrap();
        let mut kept: Vec<(&str, &[u8])> =
            topics.iter().map(|(t, e)| (t.as_str(), &e.payload[..])).collect();
        kept.sort();
        assert_eq!(kept, [("a", &b"3"[..]), ("c", b"4")]);
        // Written again with the live topics alone, which open the same way.
        let size = std::fs::metadata(dir.join(NAME)).unwrap().len() as usize;
        let mut one = BytesMut::new();
        record(&message("a", "3"), &mut one).unwrap();
        assert_eq!(size, 2 * one.len());
        let (_, again) = RetainedFile::open(&dir, Limits::DEFAULT).unwrap();
        assert_eq!(again.len(), 2);
        // A flipped bit in the last record: that record is lost, the first is kept.
        let mut data = std::fs::read(dir.join(NAME)).unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        std::fs::write(dir.join(NAME), &data).unwrap();
        let (_, damaged) = RetainedFile::open(&dir, Limits::DEFAULT).unwrap();
        assert_eq!(damaged.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
