//! Key text parsing never panics; whatever parses prints back to text that parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use whispeer_engines::Keyring;

fuzz_target!(|text: &str| {
    if let Ok(keyring) = Keyring::parse(text) {
        let printed = keyring.to_text();
        let again = Keyring::parse(&printed).expect("printed keys parse");
        assert_eq!(again.to_text().as_str(), printed.as_str());
        assert_eq!(again.current(), keyring.current());
    }
});
