//! Helpers shared by the fault test files (faults_*.rs): one run of the bitsd client against a
//! fault-injecting server, with the transcript it left and the checks on its result.
#![allow(dead_code, unused_imports)]

mod recovery;

pub use recovery::assert_recovery;

use std::time::Duration;

use bitsd::{FaultPlan, TranscriptEntry, TranscriptOptions};
use bitsd_client::{
    BitsUploader, ClientError, ReplyDestination, RetryPolicy, UploadJob, UploadOutcome,
};
use bitsd_tests::{pattern, TestServer};

/// Upload size of the matrix: four fragments of 64 KiB (the last one short).
pub const SIZE: usize = 200_000;
pub const FRAG: u64 = 65_536;
/// No run may take longer.
pub const RUN_LIMIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Upload-reply on `/echo/`: the reply must equal the upload.
    Echo,
    /// Plain upload on `/upload/`: the committed file must equal the upload.
    Upload,
}

/// A run's evidence: the transcript (in arrival order) and the job's result.
pub struct Run {
    pub entries: Vec<TranscriptEntry>,
    pub result: Result<UploadOutcome, ClientError>,
    pub data: Vec<u8>,
    pub server: TestServer,
    pub name: String,
}

impl Run {
    pub fn outcome(&self) -> &UploadOutcome {
        self.result.as_ref().unwrap()
    }

    pub fn of(&self, packet: &str) -> Vec<&TranscriptEntry> {
        self.entries.iter().filter(|e| e.packet == packet).collect()
    }

    /// The one entry where `kind` fired, and its index.
    pub fn faulted(&self, kind: &str) -> (usize, &TranscriptEntry) {
        let hits: Vec<_> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.fault.as_deref() == Some(kind))
            .collect();
        assert_eq!(hits.len(), 1, "{kind} fired {} times", hits.len());
        hits[0]
    }

    /// The request after entry `i`.
    pub fn after(&self, i: usize) -> &TranscriptEntry {
        self.entries
            .get(i + 1)
            .unwrap_or_else(|| panic!("nothing after entry {i}"))
    }
}

/// `bytes a-b/t` → (a, b, t).
pub fn content_range(e: &TranscriptEntry) -> (u64, u64, u64) {
    let v = e.range.as_deref().unwrap();
    let (range, total) = v.trim_start_matches("bytes ").split_once('/').unwrap();
    let (a, b) = range.split_once('-').unwrap();
    (
        a.parse().unwrap(),
        b.parse().unwrap(),
        total.parse().unwrap(),
    )
}

pub fn uploader(request_timeout: Duration, ping_first: bool, fragment: u64) -> BitsUploader {
    BitsUploader::builder()
        .fragment_size(fragment)
        .retry_policy(RetryPolicy {
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
            max_retries: 10,
        })
        .connect_timeout(Duration::from_secs(5))
        .request_timeout(request_timeout)
        .ping_first(ping_first)
        .build()
}

/// The transcript once every request that arrived has its line (a held-back answer may
/// finish after the job).
pub async fn settled_entries(server: &TestServer) -> Vec<TranscriptEntry> {
    let transcript = server.server().transcript().unwrap().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut entries = transcript.entries();
        entries.sort_by_key(|e| e.seq);
        let contiguous = entries
            .iter()
            .enumerate()
            .all(|(i, e)| e.seq == i as u64 + 1);
        if contiguous || tokio::time::Instant::now() > deadline {
            return entries;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a fault server with `plan` and runs one job against it.
pub async fn run_job(
    name: &str,
    plan: FaultPlan,
    mode: Mode,
    client: BitsUploader,
    size: usize,
    seed: u64,
) -> Run {
    let server = TestServer::start_with(|c| {
        c.fault_plan = Some(plan);
        c.transcript = Some(TranscriptOptions::default());
    })
    .await;
    let files = tempfile::tempdir().unwrap();
    let data = pattern(size, seed);
    let path = files.path().join("in.bin");
    std::fs::write(&path, &data).unwrap();
    let file_name = format!("{}.bin", name.replace([' ', '/', '#', ':'], "-"));
    let prefix = match mode {
        Mode::Echo => "echo",
        Mode::Upload => "upload",
    };
    let url = format!("http://{}/{prefix}/{file_name}", server.addr());
    let mut job = UploadJob::new(url, &path);
    if mode == Mode::Echo {
        job = job.reply_to(ReplyDestination::Memory);
    }
    let result = tokio::time::timeout(RUN_LIMIT, client.run(job))
        .await
        .unwrap_or_else(|_| panic!("{name}: the job did not end within {RUN_LIMIT:?}"));
    let entries = settled_entries(&server).await;
    let run = Run {
        entries,
        result,
        data,
        server,
        name: name.to_owned(),
    };
    if let Ok(out) = &run.result {
        assert_eq!(out.bytes_uploaded, size as u64);
        match mode {
            Mode::Echo => {
                let reply = out.reply.as_ref().expect("an upload-reply job has a reply");
                assert_eq!(reply.size, size as u64);
                assert!(
                    reply.bytes.as_deref() == Some(&run.data[..]),
                    "{name}: the reply differs from the upload"
                );
            }
            Mode::Upload => {
                let landed =
                    std::fs::read(run.server.data_dir().join("files").join(&file_name)).unwrap();
                assert!(landed == run.data, "{name}: the committed file differs");
            }
        }
    }
    run
}

/// Every fault kind the plan knows.
pub const ALL_KINDS: [&str; 12] = [
    "drop",
    "drop-after",
    "lose-ack",
    "status",
    "too-large",
    "resync",
    "forget-session",
    "delay-ack",
    "fail-handler",
    "truncate",
    "stall",
    "expire-session",
];
