//! Entry points for `fuzz/` targets; ordinary tests run them over the committed corpus.

use std::time::Duration;

use rustls_pki_types::UnixTime;

use crate::{HostRole, Purpose, TrustedCa, Validator};

/// Decodes arbitrary bytes as an identity certificate, unverified, then runs the
/// validator's checks that come before trust (parse, critical extensions, self-signed,
/// signature algorithm, issuer lookup) and the CA loader. Must never panic, whatever
/// the input; the results are discarded.
pub fn decode_identity(data: &[u8]) {
    let _ = crate::decode_identity_unverified(data);
    let no_trust = Validator::new([]);
    let now = UnixTime::since_unix_epoch(Duration::from_secs(1_795_478_400));
    let _ = no_trust.verify_identity(data, Purpose::UserDatabase, now);
    let _ = no_trust.verify_host(data, HostRole::Agent, now);
    let _ = TrustedCa::from_der(data);
}
