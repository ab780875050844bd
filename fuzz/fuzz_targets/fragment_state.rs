//! Arbitrary fragment schedules through the range state machine, checked against a model:
//! the held prefix only grows, writes are append-only, and the assembled bytes are the file.
#![no_main]

use bitsd_protocol::{decide_fragment, ContentRange, FragmentDecision, UploadLimits, UploadProgress};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&size, steps)) = data.split_first() else { return };
    let total = u64::from(size) * 37 + 1;
    let file: Vec<u8> = (0..total).map(|i| (i * 31 % 251) as u8).collect();
    let mut disk: Vec<u8> = Vec::new();
    let mut progress = UploadProgress::new();
    let limits = UploadLimits { max_upload_size: u64::MAX, max_fragment_size: 4096 };
    for pair in steps.chunks(2) {
        let first = u64::from(pair[0]) * total / 256;
        let len = u64::from(*pair.get(1).unwrap_or(&1)) * 16 + 1;
        let last = (first + len - 1).min(total - 1);
        let Some(range) = ContentRange::new(first, last, total) else { continue };
        let before = progress.received;
        match decide_fragment(&progress, &range, &limits) {
            Ok(FragmentDecision::Write(w)) => {
                assert_eq!(w.write_at, disk.len() as u64);
                let start = (range.first + w.skip) as usize;
                disk.extend_from_slice(&file[start..start + w.len as usize]);
                progress = w.progress_after();
            }
            Ok(FragmentDecision::AlreadyHeld { received, .. }) => assert_eq!(received, before),
            Ok(FragmentDecision::Gap { received }) => {
                assert_eq!(received, before);
                assert!(range.first > before);
            }
            Err(e) => assert_eq!(e.status(), 413),
        }
        assert!(progress.received >= before);
        assert_eq!(&disk[..], &file[..disk.len()]);
    }
});
