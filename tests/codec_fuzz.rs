//! The wire codec fuzzed: a million mutations of valid frames of every kind (flipped and random
//! bytes, extreme length and count fields, truncation, garbage appended, bytes inserted) decode
//! without a panic, and no decode allocates more than a small multiple of the frame it reads
//! (measured with a counting allocator: a length field cannot make the decoder reserve memory
//! the frame does not carry). What a decoded hidden block then claims is checked against the
//! session before any tensor is made (`HiddenBlock::check`), which is fuzzed too.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use hat::net::protocol::{CloudLoad, ErrorCode, HiddenBlock, Message, WireDtype, PROTOCOL_VERSION};
use rand::{Rng, SeedableRng};

/// Records the largest single allocation while armed.
struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One valid frame body of every kind.
fn samples() -> Vec<Vec<u8>> {
    let hidden = 8;
    let block = |count: u32, dtype: WireDtype| HiddenBlock { start: 3, count, dtype, data: vec![0x3C; count as usize * hidden * dtype.size()] };
    let load = CloudLoad { sessions: 2, busy: 0.5, us_per_row: 120.0, block_ms: 4.0 };
    let cost = hat::sched::CloudModel {
        middle: hat::sched::StageCost { fixed_ms: 1.0, per_row_ms: 0.2, ..Default::default() },
        slowdown: vec![1.0, 1.8],
    };
    [
        Message::Hello { version: PROTOCOL_VERSION, split_id: "0123456789abcdef0123456789abcdef".into(), token: "s3cret".into(), hidden_size: hidden as u32, dtype: WireDtype::F16 },
        Message::Welcome { session: 9, max_context: 4096, middle_start: 2, middle_end: 28, cost, load },
        Message::Hidden(block(3, WireDtype::F32)),
        Message::Tree { block: block(4, WireDtype::F16), parents: vec![hat::model::tree::ROOT, 0, 0, 1], keep: vec![0, 2] },
        Message::Middle { block: block(2, WireDtype::BF16), compute_us: 1234, load },
        Message::Pending { start: 3 },
        Message::Probe { echo: 64, padding: vec![0; 32] },
        Message::ProbeEcho { padding: vec![0; 16] },
        Message::Error { code: ErrorCode::Busy, message: "the cloud already serves its maximum of 16 sessions".into() },
        Message::Close,
    ]
    .iter()
    .map(Message::encode)
    .collect()
}

/// Values a length, count or position field is likely to be attacked with.
const EXTREMES: [u32; 7] = [0, 1, 0x7FFF_FFFF, 0xFFFF_FFFF, 0x0001_0000, 0xFFFF, 0x8000_0000];

fn mutate(frame: &mut Vec<u8>, rng: &mut rand::rngs::StdRng) {
    for _ in 0..rng.random_range(1..=4) {
        let len = frame.len();
        match rng.random_range(0..7) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                frame[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                frame[i] = rng.random();
            }
            2 if len >= 4 => {
                let i = rng.random_range(0..=len - 4);
                let v = EXTREMES[rng.random_range(0..EXTREMES.len())];
                frame[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            3 if len >= 2 => {
                let i = rng.random_range(0..=len - 2);
                let v = EXTREMES[rng.random_range(0..EXTREMES.len())] as u16;
                frame[i..i + 2].copy_from_slice(&v.to_le_bytes());
            }
            4 => frame.truncate(rng.random_range(0..=len)),
            5 => {
                let n = rng.random_range(1..16);
                frame.extend((0..n).map(|_| rng.random::<u8>()));
            }
            _ => {
                let i = rng.random_range(0..=len);
                frame.insert(i, rng.random());
            }
        }
    }
}

#[test]
fn a_million_mutated_frames_decode_without_panics_or_large_allocations() {
    let samples = samples();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let runs = 1_000_000;
    let (mut ok, mut largest_ratio) = (0usize, 0f64);
    let mut by_kind = [0usize; 16];
    for i in 0..runs {
        let mut frame = samples[i % samples.len()].clone();
        mutate(&mut frame, &mut rng);
        LARGEST.store(0, Ordering::Relaxed);
        ARMED.store(true, Ordering::Relaxed);
        let decoded = Message::decode(&frame);
        // What the cloud does next with a hidden block: check it against the session's settings
        // before a tensor is made of it.
        let checked = match &decoded {
            Ok(Message::Hidden(b) | Message::Tree { block: b, .. } | Message::Middle { block: b, .. }) => Some(b.check(8, b.dtype).is_ok()),
            _ => None,
        };
        ARMED.store(false, Ordering::Relaxed);
        let largest = LARGEST.load(Ordering::Relaxed);
        // Error messages are short strings; everything else is bounded by the frame.
        assert!(largest <= 2 * frame.len() + 512, "decoding a {}-byte frame allocated {largest} bytes at once: {:?}", frame.len(), &frame[..frame.len().min(32)]);
        largest_ratio = largest_ratio.max(largest as f64 / (frame.len() + 512) as f64);
        if let Ok(m) = decoded {
            ok += 1;
            by_kind[m.encode()[0] as usize % 16] += 1;
            // A decoded frame encodes back to something that decodes to the same message.
            assert_eq!(Message::decode(&m.encode()).ok(), Some(m));
        }
        let _ = checked;
    }
    eprintln!("{runs} mutated frames: {ok} still decode (by kind byte: {by_kind:?}); largest allocation {largest_ratio:.2} × (frame + 512 bytes)");
    // The mutations reach past the first byte: a good share still decodes to each kind.
    assert!(ok > runs / 20 && by_kind[1..=9].iter().all(|&n| n > 0), "{ok}: {by_kind:?}");
}
