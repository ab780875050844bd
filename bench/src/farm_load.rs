//! The farm scenario's workloads: plain uploads in fragments and small upload-reply jobs over
//! HTTP (the bench's raw client), the same bytes as bare object PUTs through bitsd's own
//! object-store client, and a PostgreSQL sampler (wait events, ungranted locks, commits).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bitsd_storage::shared::objects::{ObjectKey, Objects};
use bytes::Bytes;
use tokio::task::JoinSet;

use crate::client::{BoxError, Conn, Result};
use crate::jobs::echo_job;
use crate::util::pattern;

pub use crate::jobs::JOB_BYTES;

/// Latencies in microseconds.
#[derive(Clone, Debug, Default)]
pub struct Lat(pub Vec<u32>);

impl Lat {
    /// Records one duration.
    pub fn push(&mut self, d: Duration) {
        self.0
            .push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
    }

    /// Appends all of `other`.
    pub fn extend(&mut self, other: &Lat) {
        self.0.extend_from_slice(&other.0);
    }

    /// The `p` quantile in milliseconds (0 when empty).
    pub fn ms(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let mut v = self.0.clone();
        v.sort_unstable();
        let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
        f64::from(v[rank - 1]) / 1000.0
    }
}

/// What one measurement produced.
#[derive(Clone, Debug, Default)]
pub struct Run {
    /// Wall time.
    pub elapsed: Duration,
    /// Bytes uploaded (fragment cases).
    pub bytes: u64,
    /// Jobs finished (job cases).
    pub jobs: u64,
    /// Per-fragment latency (Fragment Ack, or one PUT), every fragment but each upload's last
    /// (whose Ack also waits for the upload's completion).
    pub fragment: Lat,
    /// Each upload's last Fragment Ack (fragment cases): the upload's completion (assembly)
    /// included. For bare PUTs, the last PUT.
    pub last: Lat,
    /// Whole-job latency (job cases).
    pub job: Lat,
    /// Job cases: Create-Session, GET of the reply, Close-Session latency (bare: —, GET,
    /// DELETE).
    pub packets: [Lat; 3],
}

/// `sessions` concurrent plain uploads of `each` bytes in `fragment`-byte fragments, each
/// closed at the end.
pub async fn http_fragments(
    addr: SocketAddr,
    tag: &str,
    sessions: usize,
    each: u64,
    fragment: usize,
    payload: &Bytes,
) -> Result<Run> {
    let conns = Conn::connect_many(addr, sessions).await?;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let path = format!("/upload/farmbench/{tag}-{i}.bin");
        let payload = payload.clone();
        set.spawn(async move {
            let (mut lat, mut last) = (Lat::default(), Lat::default());
            let sid = conn.create_session(&path).await?;
            let mut at = 0u64;
            while at < each {
                let len = (fragment as u64).min(each - at) as usize;
                let t = Instant::now();
                conn.fragment(&path, &sid, at, &payload[..len], each)
                    .await?;
                at += len as u64;
                if at < each {
                    lat.push(t.elapsed());
                } else {
                    last.push(t.elapsed());
                }
            }
            conn.close_session(&path, &sid).await?;
            Ok::<_, BoxError>((lat, last))
        });
    }
    let mut run = Run::default();
    while let Some(r) = set.join_next().await {
        let (lat, last) = r??;
        run.fragment.extend(&lat);
        run.last.extend(&last);
    }
    run.elapsed = started.elapsed();
    run.bytes = each * sessions as u64;
    Ok(run)
}

/// The same bytes as bare PUTs: `sessions` concurrent writers, each storing `each` bytes as
/// `fragment`-byte objects one after another, through a fresh writer per object (what a node
/// does per fragment). The objects are deleted afterwards (not timed).
pub async fn bare_fragments(
    objects: &Objects,
    tag: &str,
    sessions: usize,
    each: u64,
    fragment: usize,
    payload: &Bytes,
) -> Result<Run> {
    let started = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..sessions {
        let (objects, payload) = (objects.clone(), payload.clone());
        let prefix = objects.prefix().join(&format!("bare/{tag}-{i}"));
        set.spawn(async move {
            let (mut lat, mut last) = (Lat::default(), Lat::default());
            let mut keys = Vec::new();
            let mut at = 0u64;
            while at < each {
                let len = (fragment as u64).min(each - at) as usize;
                let key = prefix.join(&format!("{at:020}"));
                let t = Instant::now();
                let mut w = objects.writer(key.clone());
                w.write_bytes(payload.slice(..len)).await?;
                w.finish().await?;
                at += len as u64;
                if at < each {
                    lat.push(t.elapsed());
                } else {
                    last.push(t.elapsed());
                }
                keys.push(key);
            }
            Ok::<_, BoxError>((lat, last, keys))
        });
    }
    let mut run = Run::default();
    let mut keys: Vec<ObjectKey> = Vec::new();
    while let Some(r) = set.join_next().await {
        let (lat, last, k) = r??;
        run.fragment.extend(&lat);
        run.last.extend(&last);
        keys.extend(k);
    }
    run.elapsed = started.elapsed();
    run.bytes = each * sessions as u64;
    delete_retrying(objects, &keys).await?;
    Ok(run)
}

/// Deletes `keys`, trying up to three times: Garage's SQLite metadata engine now and then
/// answers a DeleteObjects under load with a transient `database is locked` (503), which
/// would otherwise end the whole benchmark run on the baseline's own clean-up.
pub async fn delete_retrying(objects: &Objects, keys: &[ObjectKey]) -> Result<()> {
    let mut tries = 0;
    loop {
        tries += 1;
        match objects.delete(keys).await {
            Ok(()) => return Ok(()),
            Err(e) if tries < 3 && e.is_transient() => {
                eprintln!("bench: bare DELETE failed ({e}); trying again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// `clients` connections each running 4 KiB echo jobs (Create-Session, one Fragment, GET of
/// the reply, Close-Session) back to back for `secs`.
pub async fn http_jobs(addr: SocketAddr, tag: &str, clients: usize, secs: f64) -> Result<Run> {
    let body = Bytes::from(pattern(JOB_BYTES, 7));
    let conns = Conn::connect_many(addr, clients).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let mut set = JoinSet::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let (body, tag) = (body.clone(), tag.to_owned());
        set.spawn(async move {
            let (mut frag, mut job) = (Lat::default(), Lat::default());
            let mut packets: [Lat; 3] = Default::default();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let path = format!("/echo/farmbench/{tag}-{i}-{n}.bin");
                let t0 = Instant::now();
                let [create, fragment, get, close] = echo_job(&mut conn, &path, &body).await?;
                frag.push(fragment);
                for (samples, d) in packets.iter_mut().zip([create, get, close]) {
                    samples.push(d);
                }
                job.push(t0.elapsed());
                n += 1;
            }
            Ok::<_, BoxError>((n, frag, job, packets))
        });
    }
    let mut run = Run::default();
    while let Some(r) = set.join_next().await {
        let (n, frag, job, packets) = r??;
        run.jobs += n;
        run.fragment.extend(&frag);
        run.job.extend(&job);
        for (all, one) in run.packets.iter_mut().zip(&packets) {
            all.extend(one);
        }
    }
    run.elapsed = started.elapsed();
    Ok(run)
}

/// The bare-store counterpart of a job: PUT of the 4 KiB upload, GET of it back (as the
/// reply), DELETE; `clients` loops for `secs`. The "fragment" latency is the PUT's.
pub async fn bare_jobs(objects: &Objects, tag: &str, clients: usize, secs: f64) -> Result<Run> {
    let body = Bytes::from(pattern(JOB_BYTES, 7));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let mut set = JoinSet::new();
    for i in 0..clients {
        let (objects, body) = (objects.clone(), body.clone());
        let prefix = objects.prefix().join(&format!("bare/{tag}-{i}"));
        set.spawn(async move {
            let (mut frag, mut job) = (Lat::default(), Lat::default());
            let mut packets: [Lat; 3] = Default::default();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let key = prefix.join(&n.to_string());
                let t0 = Instant::now();
                let mut w = objects.writer(key.clone());
                w.write_bytes(body.clone()).await?;
                w.finish().await?;
                frag.push(t0.elapsed());
                let t = Instant::now();
                let got = objects.read(&key, None).await?.bytes().await?;
                packets[1].push(t.elapsed());
                if got.len() != JOB_BYTES {
                    return Err(format!("bare GET returned {} bytes", got.len()).into());
                }
                let t = Instant::now();
                delete_retrying(&objects, &[key]).await?;
                packets[2].push(t.elapsed());
                job.push(t0.elapsed());
                n += 1;
            }
            Ok::<_, BoxError>((n, frag, job, packets))
        });
    }
    let mut run = Run::default();
    while let Some(r) = set.join_next().await {
        let (n, frag, job, packets) = r??;
        run.jobs += n;
        run.fragment.extend(&frag);
        run.job.extend(&job);
        for (all, one) in run.packets.iter_mut().zip(&packets) {
            all.extend(one);
        }
    }
    run.elapsed = started.elapsed();
    Ok(run)
}
