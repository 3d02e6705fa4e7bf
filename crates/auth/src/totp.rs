//! Time-based one-time passwords (RFC 6238) over HMAC-based ones (RFC 4226).
//!
//! The secret is shown to users as base32 (RFC 4648, no padding), the form
//! authenticator apps read from `otpauth://` URIs.

use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::Error;

/// Length of the secrets we generate: 160 bits, the size RFC 4226 recommends.
pub const SECRET_SIZE: usize = 20;
/// Codes from this many steps before or after now are also accepted (clock drift).
pub const DRIFT_STEPS: u64 = 1;

/// The hash under the HMAC. Authenticator apps mostly only do SHA-1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Sha1,
    Sha256,
    Sha512,
}

/// A TOTP generator: secret, hash, number of digits and step length.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totp {
    #[serde(with = "base32_serde")]
    secret: Vec<u8>,
    algorithm: Algorithm,
    digits: u32,
    step_secs: u64,
}

impl std::fmt::Debug for Totp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is a credential: never in logs.
        f.debug_struct("Totp")
            .field("algorithm", &self.algorithm)
            .field("digits", &self.digits)
            .field("step_secs", &self.step_secs)
            .finish_non_exhaustive()
    }
}

impl Totp {
    /// The usual parameters: SHA-1, 6 digits, 30-second steps.
    pub fn new(secret: Vec<u8>) -> Self {
        Self::with_parameters(secret, Algorithm::Sha1, 6, 30)
    }

    /// Any parameters; `digits` is clamped to 6..=9 and `step_secs` to at least 1.
    pub fn with_parameters(
        secret: Vec<u8>,
        algorithm: Algorithm,
        digits: u32,
        step_secs: u64,
    ) -> Self {
        Self {
            secret,
            algorithm,
            digits: digits.clamp(6, 9),
            step_secs: step_secs.max(1),
        }
    }

    /// A fresh secret from `rng`.
    pub fn generate(rng: &mut impl rand_core::RngCore) -> Self {
        let mut secret = vec![0; SECRET_SIZE];
        rng.fill_bytes(&mut secret);
        Self::new(secret)
    }

    /// The secret in base32, for typing into an authenticator app.
    pub fn secret_base32(&self) -> String {
        base32_encode(&self.secret)
    }

    /// An `otpauth://` URI for QR codes.
    pub fn uri(&self, issuer: &str, user: &str) -> String {
        let algorithm = match self.algorithm {
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
            Algorithm::Sha512 => "SHA512",
        };
        format!(
            "otpauth://totp/{issuer}:{user}?secret={}&issuer={issuer}&algorithm={algorithm}&digits={}&period={}",
            self.secret_base32(),
            self.digits,
            self.step_secs
        )
    }

    /// The step (time counter) that `unix_secs` falls in.
    pub fn step(&self, unix_secs: u64) -> u64 {
        unix_secs / self.step_secs
    }

    /// The code for `step` (RFC 4226 HOTP with the step as counter).
    pub fn code_for_step(&self, step: u64) -> String {
        let algorithm = match self.algorithm {
            Algorithm::Sha1 => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            Algorithm::Sha256 => hmac::HMAC_SHA256,
            Algorithm::Sha512 => hmac::HMAC_SHA512,
        };
        let key = hmac::Key::new(algorithm, &self.secret);
        let tag = hmac::sign(&key, &step.to_be_bytes());
        let mac = tag.as_ref();
        // Dynamic truncation (RFC 4226 §5.3): the low nibble of the last byte picks four
        // bytes; every HMAC here is at least 20 bytes, so offset + 4 <= 19 + 1.
        let offset = usize::from(mac[mac.len() - 1] & 0x0f);
        let binary = u32::from_be_bytes([
            mac[offset],
            mac[offset + 1],
            mac[offset + 2],
            mac[offset + 3],
        ]) & 0x7fff_ffff;
        let code = u64::from(binary) % 10u64.pow(self.digits);
        format!("{code:0width$}", width = self.digits as usize)
    }

    /// The code at `unix_secs`.
    pub fn code_at(&self, unix_secs: u64) -> String {
        self.code_for_step(self.step(unix_secs))
    }

    /// The step whose code `code` is, within [`DRIFT_STEPS`] of `unix_secs`, and later
    /// than `after_step` (a code is good once). Compares in constant time.
    pub fn verify(&self, code: &str, unix_secs: u64, after_step: Option<u64>) -> Option<u64> {
        let now = self.step(unix_secs);
        let first = now.saturating_sub(DRIFT_STEPS);
        let mut found = None;
        for step in first..=now.saturating_add(DRIFT_STEPS) {
            let fresh = after_step.is_none_or(|used| step > used);
            // Evaluate every candidate so timing does not depend on which one matched.
            if constant_time_eq(self.code_for_step(step).as_bytes(), code.as_bytes()) && fresh {
                found = Some(step);
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

const BASE32_ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// RFC 4648 base32 without padding.
pub fn base32_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in bytes {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(
                BASE32_ALPHABET[((buffer >> bits) & 0x1f) as usize],
            ));
        }
    }
    if bits > 0 {
        out.push(char::from(
            BASE32_ALPHABET[((buffer << (5 - bits)) & 0x1f) as usize],
        ));
    }
    out
}

/// RFC 4648 base32; accepts lower case, spaces and `=` padding, as people type it.
pub fn base32_decode(text: &str) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for c in text.chars().filter(|c| !c.is_whitespace() && *c != '=') {
        let upper = c.to_ascii_uppercase();
        let Some(value) = BASE32_ALPHABET.iter().position(|&a| char::from(a) == upper) else {
            return Err(Error::invalid(
                "totp secret",
                format!("{c:?} is not base32"),
            ));
        };
        buffer = (buffer << 5) | value as u32;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
        buffer &= (1 << bits) - 1;
    }
    Ok(out)
}

mod base32_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::base32_encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        super::base32_decode(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 6238 appendix B: the published 8-digit codes for all three hashes.
    #[test]
    fn rfc6238_test_vectors() {
        let sha1 = b"12345678901234567890".to_vec();
        let sha256 = b"12345678901234567890123456789012".to_vec();
        let sha512 = b"1234567890123456789012345678901234567890123456789012345678901234".to_vec();
        let vectors: [(u64, &str, &str, &str); 6] = [
            (59, "94287082", "46119246", "90693936"),
            (1111111109, "07081804", "68084774", "25091201"),
            (1111111111, "14050471", "67062674", "99943326"),
            (1234567890, "89005924", "91819424", "93441116"),
            (2000000000, "69279037", "90698825", "38618901"),
            (20000000000, "65353130", "77737706", "47863826"),
        ];
        for (time, code_sha1, code_sha256, code_sha512) in vectors {
            let totp = Totp::with_parameters(sha1.clone(), Algorithm::Sha1, 8, 30);
            assert_eq!(totp.code_at(time), code_sha1, "SHA-1 at {time}");
            let totp = Totp::with_parameters(sha256.clone(), Algorithm::Sha256, 8, 30);
            assert_eq!(totp.code_at(time), code_sha256, "SHA-256 at {time}");
            let totp = Totp::with_parameters(sha512.clone(), Algorithm::Sha512, 8, 30);
            assert_eq!(totp.code_at(time), code_sha512, "SHA-512 at {time}");
        }
    }

    // RFC 4226 appendix D: the HOTP values for counters 0..=9.
    #[test]
    fn rfc4226_test_vectors() {
        let totp = Totp::new(b"12345678901234567890".to_vec());
        let expected = [
            "755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583",
            "399871", "520489",
        ];
        for (counter, code) in expected.iter().enumerate() {
            assert_eq!(
                totp.code_for_step(counter as u64),
                *code,
                "counter {counter}"
            );
        }
    }

    // A code is accepted within one step of drift, not beyond, and only once.
    #[test]
    fn verify_accepts_drift_and_refuses_reuse() {
        let totp = Totp::new(b"12345678901234567890".to_vec());
        let now = 1_800_000_000;
        let code = totp.code_at(now);
        let step = totp
            .verify(&code, now + 30, None)
            .expect("one step late is accepted");
        assert_eq!(step, totp.step(now));
        assert_eq!(
            totp.verify(&code, now + 60, None),
            None,
            "two steps late is refused"
        );
        assert_eq!(
            totp.verify(&code, now, Some(step)),
            None,
            "a used code is refused"
        );
        assert_eq!(totp.verify("000000x", now, None), None);
        assert_eq!(totp.verify("", now, None), None);
    }

    // RFC 4648 §10 base32 vectors, and decoding is the inverse of encoding.
    #[test]
    fn base32_round_trips() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI"),
        ] {
            assert_eq!(base32_encode(plain.as_bytes()), encoded);
            assert_eq!(base32_decode(encoded).unwrap(), plain.as_bytes());
        }
        assert_eq!(base32_decode("mzxw 6ytb oi==").unwrap(), b"foobar");
        assert!(base32_decode("MZ1W").is_err());
    }
}
