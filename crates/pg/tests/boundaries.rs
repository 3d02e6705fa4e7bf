//! `frame::Boundaries`: where tagged messages end, by counting headers only.

mod support;

use postern_pg::frame::Boundaries;
use proptest::collection::vec;
use proptest::prelude::*;

// Goal: boundaries are found whatever the reads' sizes, and lost for good after a
// length below 4.
#[test]
fn boundaries_across_reads() {
    let bytes = support::TWO_MESSAGES;
    for split in 0..=bytes.len() {
        let mut boundaries = Boundaries::default();
        boundaries.advance(&bytes[..split]);
        let expected = support::to_boundary_after(split);
        assert_eq!(
            boundaries.to_boundary(),
            Some(expected),
            "after {split} bytes"
        );
        assert_eq!(
            boundaries.at_boundary(),
            expected == 0,
            "after {split} bytes"
        );
        boundaries.advance(&bytes[split..]);
        assert_eq!(boundaries.to_boundary(), Some(0));
    }
    let mut boundaries = Boundaries::default();
    boundaries.advance(&[b'D', 0, 0, 0, 3, b'Z', 0, 0, 0, 4]);
    assert_eq!(boundaries.to_boundary(), None);
    assert!(!boundaries.at_boundary());
}

proptest! {
    // Goal: fed any sequence of messages in any cuts, the counter is at a boundary
    // exactly where a message ends, and reading `to_boundary()` bytes never passes one.
    #[test]
    fn boundaries_match_message_ends(
        bodies in vec((any::<u8>(), vec(any::<u8>(), 0..300)), 1..20),
        cuts in vec(1usize..64, 1..8),
    ) {
        let mut stream = Vec::new();
        let mut ends = Vec::new();
        for (tag, body) in &bodies {
            stream.push(*tag);
            stream.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
            stream.extend_from_slice(body);
            ends.push(stream.len());
        }
        let mut boundaries = Boundaries::default();
        let mut at = 0;
        let mut cut = cuts.iter().cycle();
        while at < stream.len() {
            let left = boundaries.to_boundary().expect("lengths are valid");
            let next_end = ends.iter().copied().find(|&end| end > at).unwrap_or(stream.len());
            if left > 0 {
                prop_assert!(at + left <= next_end, "{left} bytes from {at} pass {next_end}");
            }
            let len = (*cut.next().unwrap_or(&1)).min(stream.len() - at);
            boundaries.advance(&stream[at..at + len]);
            at += len;
            prop_assert_eq!(boundaries.at_boundary(), ends.contains(&at), "at {}", at);
        }
    }
}
