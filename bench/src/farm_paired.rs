//! The per-fragment overhead measured fragment by fragment (`--farm-paired-uploads`): one
//! upload through a farm target, and beside each of its fragments a bare PUT of the same
//! bytes (and, for a target behind nginx, one more through the same kind of nginx), one
//! right after the other (which goes first alternating from one fragment to the next).
//!
//! The rounds' figure (`farm_report`) compares a whole upload's p50 with a whole run of bare
//! PUTs seconds earlier: whatever the store does in between (its own background work, the
//! clean-up of the case before, a run of slower answers) lands on one side only, and on this
//! 2-core machine that moved the 1 MiB overhead by more than a millisecond from run to run
//! (docs/farm-performance-log-3.md). Here both sides of a pair meet the same store within a
//! few milliseconds, so the p50 of each side, and of the pairs' differences, compare
//! fragments under the same conditions. Each upload's last fragment (its completion) has no
//! pair, as in the rounds.

use std::time::{Duration, Instant};

use bitsd_storage::shared::objects::{ObjectKey, Objects};
use bytes::Bytes;
use futures_util::future::OptionFuture;
use serde::Serialize;

use crate::client::{Conn, Result};
use crate::farm::{upload_bytes, Case, FarmArgs, Target};
use crate::farm_env::FarmEnv;
use crate::farm_load::{delete_retrying, Lat};
use crate::farm_report::median;
use crate::util::{size_label, MIB};

/// The farm targets measured, each against bare PUTs straight to the store (the check's
/// baseline).
const TARGETS: [Target; 3] = [Target::Farm1, Target::Farm1Lb, Target::Farm3];

/// The fragment sizes measured.
const SIZES: [usize; 2] = [MIB as usize, 64 * 1024];

/// One target at one fragment size, every pair of every upload.
#[derive(Clone, Debug, Default)]
struct Pairs {
    farm: Lat,
    bare: Lat,
    /// Bare PUTs through nginx (targets behind nginx only).
    bare_lb: Lat,
    /// Farm minus bare, per pair, µs.
    diff: Vec<i64>,
    /// Farm minus bare through nginx, per pair, µs.
    diff_lb: Vec<i64>,
}

/// The median of differences in µs, in ms.
fn median_ms(v: &[i64]) -> f64 {
    median(v.iter().map(|&us| us as f64 / 1000.0).collect())
}

/// One row of the paired measurement.
#[derive(Clone, Debug, Serialize)]
pub struct PairedRow {
    /// Where the farm's fragments went.
    pub target: Target,
    /// Fragment size, bytes.
    pub fragment: usize,
    /// Pairs measured.
    pub pairs: usize,
    /// Fragment Ack p50 through the target, ms.
    pub farm_p50_ms: f64,
    /// Bare PUT p50, ms.
    pub bare_p50_ms: f64,
    /// `farm_p50_ms - bare_p50_ms`.
    pub overhead_ms: f64,
    /// For a target behind nginx, the bare PUT's p50 through the same kind of nginx, ms (the
    /// balancer's own hop is the difference to `bare_p50_ms`).
    pub bare_lb_p50_ms: Option<f64>,
    /// The median of the pairs' differences, ms: the per-fragment overhead at p50 (the
    /// check; each difference is of two writes under the same conditions).
    pub median_diff_ms: f64,
    /// For a target behind nginx, the same over the bare PUTs through nginx, ms.
    pub median_diff_lb_ms: Option<f64>,
    /// Fragment Ack p99 through the target, and the bare PUT's, ms.
    pub p99_ms: (f64, f64),
}

impl PairedRow {
    /// The check's label, figure and verdict (< 2 ms, for the median of the pairs'
    /// differences).
    pub fn check(&self) -> (String, String, bool) {
        let what = self.target.check_phrase();
        (
            format!(
                "per-fragment overhead of {what} over a bare PUT, p50, {}, fragment by \
                 fragment",
                size_label(self.fragment as u64)
            ),
            format!(
                "{:.2} ms (target < 2 ms; median of {} pairs' differences; p50 {:.2} against \
                 {:.2} ms, a difference of {:.2} ms{})",
                self.median_diff_ms,
                self.pairs,
                self.farm_p50_ms,
                self.bare_p50_ms,
                self.overhead_ms,
                self.median_diff_lb_ms
                    .map_or_else(String::new, |lb| format!(
                        "; over a bare PUT through the same nginx {lb:.2} ms"
                    ))
            ),
            self.median_diff_ms < 2.0,
        )
    }
}

/// Runs `a.farm_paired_uploads` uploads per target and size, rotating through them (one
/// upload of each target at 1 MiB, then at 64 KiB, then again).
pub async fn measure(env: &FarmEnv, a: &FarmArgs, payload: &Bytes) -> Result<Vec<PairedRow>> {
    let objects = (env.objects()?, env.objects_lb()?);
    let mut all: Vec<Pairs> = vec![Pairs::default(); TARGETS.len() * SIZES.len()];
    for round in 0..a.farm_paired_uploads {
        for (s, &size) in SIZES.iter().enumerate() {
            for (t, &target) in TARGETS.iter().enumerate() {
                eprintln!(
                    "bench: farm paired {}/{}: {} fragments → {} against bare PUTs",
                    round + 1,
                    a.farm_paired_uploads,
                    size_label(size as u64),
                    target.name()
                );
                let each = upload_bytes(a, Case::Fragments(size));
                let tag = format!("paired-{round}-{s}-{t}");
                let pairs = &mut all[s * TARGETS.len() + t];
                one_upload(env, target, &objects, &tag, each, size, payload, pairs).await?;
            }
        }
    }
    let mut rows = Vec::new();
    for (s, &size) in SIZES.iter().enumerate() {
        for (t, &target) in TARGETS.iter().enumerate() {
            let p = &all[s * TARGETS.len() + t];
            let (farm, bare) = (p.farm.ms(0.5), p.bare.ms(0.5));
            let lb = !p.bare_lb.0.is_empty();
            rows.push(PairedRow {
                target,
                fragment: size,
                pairs: p.diff.len(),
                farm_p50_ms: farm,
                bare_p50_ms: bare,
                overhead_ms: farm - bare,
                bare_lb_p50_ms: lb.then(|| p.bare_lb.ms(0.5)),
                median_diff_ms: median_ms(&p.diff),
                median_diff_lb_ms: lb.then(|| median_ms(&p.diff_lb)),
                p99_ms: (p.farm.ms(0.99), p.bare.ms(0.99)),
            });
        }
    }
    Ok(rows)
}

/// One upload of `each` bytes in `fragment`-byte fragments through `target`, each fragment
/// but the last paired with a bare PUT of the same bytes (and one through nginx when `target`
/// is behind nginx).
#[allow(clippy::too_many_arguments)]
async fn one_upload(
    env: &FarmEnv,
    target: Target,
    objects: &(Objects, Objects),
    tag: &str,
    each: u64,
    fragment: usize,
    payload: &Bytes,
    pairs: &mut Pairs,
) -> Result<()> {
    let addr = match target {
        Target::Farm1 => env.nodes[0].addr,
        Target::Farm1Lb => env.nginx1.addr(),
        _ => env.nginx.addr(),
    };
    let mut conn = Conn::connect(addr).await?;
    let path = format!("/upload/farmbench/{tag}.bin");
    let sid = conn.create_session(&path).await?;
    let (direct, lb) = objects;
    let behind_nginx = target != Target::Farm1;
    let prefix = direct.prefix().join(&format!("bare/{tag}"));
    let mut keys = Vec::new();
    let (mut at, mut i) = (0u64, 0usize);
    while at < each {
        let len = (fragment as u64).min(each - at) as usize;
        let body = payload.slice(..len);
        if at + len as u64 == each {
            conn.fragment(&path, &sid, at, &body, each).await?;
            break;
        }
        let (key, key_lb) = (
            prefix.join(&format!("{at:020}")),
            prefix.join(&format!("{at:020}-lb")),
        );
        let bare_lb =
            OptionFuture::from(behind_nginx.then(|| put(lb, key_lb.clone(), body.clone())));
        let (farm, bare, bare_lb) = if i % 2 == 0 {
            let bare = put(direct, key.clone(), body.clone()).await?;
            let bare_lb = bare_lb.await.transpose()?;
            let farm = timed_fragment(&mut conn, &path, &sid, at, &body, each).await?;
            (farm, bare, bare_lb)
        } else {
            let farm = timed_fragment(&mut conn, &path, &sid, at, &body, each).await?;
            let bare_lb = bare_lb.await.transpose()?;
            (farm, put(direct, key.clone(), body.clone()).await?, bare_lb)
        };
        pairs.farm.push(farm);
        pairs.bare.push(bare);
        if let Some(d) = bare_lb {
            pairs.bare_lb.push(d);
            pairs
                .diff_lb
                .push(farm.as_micros() as i64 - d.as_micros() as i64);
            keys.push(key_lb);
        }
        pairs
            .diff
            .push(farm.as_micros() as i64 - bare.as_micros() as i64);
        keys.push(key);
        at += len as u64;
        i += 1;
    }
    conn.close_session(&path, &sid).await?;
    delete_retrying(direct, &keys).await
}

/// One Fragment of `body` at `at` of the upload of `each` bytes at `path`, timed to its Ack.
async fn timed_fragment(
    conn: &mut Conn,
    path: &str,
    sid: &str,
    at: u64,
    body: &[u8],
    each: u64,
) -> Result<Duration> {
    let t = Instant::now();
    conn.fragment(path, sid, at, body, each).await?;
    Ok(t.elapsed())
}

/// One bare PUT of `body` at `key`, timed (a fresh writer, as a node uses per fragment).
async fn put(objects: &Objects, key: ObjectKey, body: Bytes) -> Result<Duration> {
    let t = Instant::now();
    let mut w = objects.writer(key);
    w.write_bytes(body).await?;
    w.finish().await?;
    Ok(t.elapsed())
}
