//! Seal and open throughput (MB/s of plaintext) for each compression and cipher choice at
//! 128 B, 4 KiB and 64 KiB.
//!
//! The payload is JSON-like text with varying numbers (compresses about 3–5×), closer to real
//! traffic than zeros or noise. Also boxes sealed per recipient device (`seal_for`) for 1 to 100
//! devices, and the ciphers alone beside them (`raw-cipher-*`: what sealing costs at least).
//! Run with `cargo bench -p whispeer-engines --bench seal`.

#![expect(clippy::unwrap_used, reason = "a benchmark fails loudly on any error")]
#![expect(missing_docs, reason = "criterion_group! generates an undocumented function")]

use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use whispeer_engines::{
    CipherAlgorithm, Compression, Encryption, Engines, GroupKey, Identity, Keyring, PairKeys,
    Sealing, open_group, open_pairwise, open_sealed, seal_for, seal_group, seal_pairwise,
};
use whispeer_proto::{ContentType, Envelope, Flags, Headers, MessageId, Topic};

fn payload(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let record = format!(
            r#"{{"sensor":"s-{}","celsius":{}.{},"ok":true}},"#,
            state % 97,
            state % 40,
            state % 10
        );
        out.extend_from_slice(record.as_bytes());
    }
    out.truncate(len);
    out
}

fn configurations() -> Vec<(String, Engines)> {
    let keyring = Keyring::generate().unwrap();
    let mut out = Vec::new();
    for (cname, compression) in
        [("none", None), ("zstd3", Some(Compression::new())), ("lz4", Some(Compression::lz4()))]
    {
        for (ename, cipher) in [
            ("plain", None),
            ("xchacha", Some(CipherAlgorithm::XChaCha20Poly1305)),
            ("aes-gcm", Some(CipherAlgorithm::Aes256Gcm)),
        ] {
            let mut engines = Engines::new();
            if let Some(c) = compression {
                engines = engines.with_compression(c.threshold(0));
            }
            if let Some(c) = cipher {
                engines =
                    engines.with_encryption(Encryption::with_keyring(keyring.clone()).cipher(c));
            }
            out.push((format!("{cname}+{ename}"), engines));
        }
    }
    out
}

fn seal_open(c: &mut Criterion) {
    let topic = Topic::parse("sensor/kitchen/temperature").unwrap();
    let headers = Headers::new();
    let content = Flags::with_content(ContentType::Raw);
    for size in [128usize, 4096, 65_536] {
        let plaintext = Bytes::from(payload(size));
        let mut group = c.benchmark_group(format!("engines-{size}B"));
        group.throughput(Throughput::Bytes(size as u64));
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(1))
            .warm_up_time(Duration::from_millis(300));
        for (name, engines) in configurations() {
            let meta = Sealing {
                topic: topic.as_str(),
                id: MessageId(1),
                timestamp_ms: 1,
                headers: &headers,
            };
            group.bench_function(BenchmarkId::new("seal", &name), |b| {
                b.iter(|| engines.seal(&meta, content, plaintext.clone()).unwrap())
            });
            let (flags, sealed) = engines.seal(&meta, content, plaintext.clone()).unwrap();
            let envelope = Envelope::new(MessageId(1), topic.clone(), 1, flags, sealed);
            group.bench_function(BenchmarkId::new("open", &name), |b| {
                b.iter(|| engines.open(&envelope).unwrap())
            });
        }
        group.finish();
    }
}

/// Boxes sealed per recipient device (`seal_for`): the cost per message for 1, 2, 8 and 100
/// devices, and of opening one, beside the shared-key seal above (`engines-128B`).
fn sealed_boxes(c: &mut Criterion) {
    let plaintext = payload(128);
    let sender = Identity::generate().unwrap();
    let mut group = c.benchmark_group("sealed-box-128B");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(1))
        .warm_up_time(Duration::from_millis(300));
    for devices in [1usize, 2, 8, 100] {
        let identities: Vec<Identity> =
            (0..devices).map(|_| Identity::generate().unwrap()).collect();
        let publics: Vec<_> = identities.iter().map(|i| i.public("d")).collect();
        group.bench_function(BenchmarkId::new("seal", devices), |b| {
            b.iter(|| seal_for(&sender, &publics, b"bench", &plaintext).unwrap())
        });
        let sealed = seal_for(&sender, &publics, b"bench", &plaintext).unwrap();
        group.bench_function(BenchmarkId::new("open", devices), |b| {
            b.iter(|| open_sealed(&identities[0], &sealed, b"bench", None).unwrap())
        });
        // The chat's direct messages: pair keys derived once per peer device, then kept.
        let mut pairs = PairKeys::default();
        group.bench_function(BenchmarkId::new("seal-pairwise", devices), |b| {
            b.iter(|| seal_pairwise(&sender, &mut pairs, &publics, b"bench", &plaintext).unwrap())
        });
        let sealed = seal_pairwise(&sender, &mut pairs, &publics, b"bench", &plaintext).unwrap();
        let mut theirs = PairKeys::default();
        group.bench_function(BenchmarkId::new("open-pairwise", devices), |b| {
            b.iter(|| open_pairwise(&identities[0], &mut theirs, &sealed, b"bench").unwrap())
        });
    }
    let key = GroupKey::generate(1).unwrap();
    group.bench_function("seal-group-message", |b| {
        b.iter(|| seal_group(&sender, &key, b"bench", &plaintext).unwrap())
    });
    let sealed = seal_group(&sender, &key, b"bench", &plaintext).unwrap();
    group.bench_function("open-group-message", |b| {
        b.iter(|| open_group(&key, &sealed, b"bench", None).unwrap())
    });
    group.finish();
}

/// The ciphers alone, at their best: a key set up once, sealed in place in a buffer that is
/// reused, no associated data beyond the topic, no nonce drawn. The floor under `seal` above:
/// what remains between them is the envelope's associated data, the nonce, the key id and the
/// output's allocation.
fn raw_ciphers(c: &mut Criterion) {
    use chacha20poly1305::{AeadInOut, KeyInit, XChaCha20Poly1305, XNonce};
    let key = [7u8; 32];
    let aad = b"sensor/kitchen/temperature";
    for size in [128usize, 4096, 65_536] {
        let plaintext = payload(size);
        let mut group = c.benchmark_group(format!("raw-cipher-{size}B"));
        group.throughput(Throughput::Bytes(size as u64));
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(1))
            .warm_up_time(Duration::from_millis(300));
        let mut buffer = plaintext.clone();
        let rustcrypto = XChaCha20Poly1305::new(&key.into());
        let nonce = <&XNonce>::try_from(&[3u8; 24][..]).unwrap();
        group.bench_function("rustcrypto-xchacha20poly1305", |b| {
            b.iter(|| {
                buffer.copy_from_slice(&plaintext);
                rustcrypto.encrypt_inout_detached(nonce, aad, buffer.as_mut_slice().into()).unwrap()
            })
        });
        #[cfg(feature = "ring")]
        {
            use ring::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
            for (name, algorithm) in
                [("ring-chacha20poly1305", &CHACHA20_POLY1305), ("ring-aes256gcm", &AES_256_GCM)]
            {
                let ring_key = LessSafeKey::new(UnboundKey::new(algorithm, &key).unwrap());
                group.bench_function(name, |b| {
                    b.iter(|| {
                        buffer.copy_from_slice(&plaintext);
                        let nonce = Nonce::assume_unique_for_key([3u8; 12]);
                        ring_key
                            .seal_in_place_separate_tag(nonce, Aad::from(aad), &mut buffer)
                            .unwrap()
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, seal_open, sealed_boxes, raw_ciphers);
criterion_main!(benches);
