//! Properties of request parsing and validation: no input makes it panic, and every amount it
//! accepts is exact.

use proptest::prelude::*;
use txoutbox_service::orders::{parse_new_order, Amount};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_new_order(&body);
    }

    #[test]
    fn arbitrary_amount_text_never_panics_and_accepted_amounts_round_trip(text in "\\PC{0,40}") {
        if let Ok(amount) = Amount::parse(&text) {
            prop_assert!(amount.cents() > 0);
            prop_assert!(amount.cents() <= 999_999_999_999);
            prop_assert_eq!(Amount::parse(&amount.to_string()), Ok(amount));
        }
    }

    #[test]
    fn json_shaped_bodies_never_panic(
        user in "[0-9a-fA-F-]{0,40}",
        amount in prop_oneof![
            "-?[0-9]{0,16}(\\.[0-9]{0,4})?([eE][+-]?[0-9]{1,4})?",
            "\"[^\"\\\\]{0,20}\"",
            Just("null".to_string()),
            Just("true".to_string()),
            Just("[]".to_string()),
            Just("{}".to_string()),
        ],
    ) {
        let body = format!(r#"{{"user_id":"{user}","amount":{amount}}}"#);
        let _ = parse_new_order(body.as_bytes());
    }

    #[test]
    fn every_valid_amount_is_accepted_exactly(whole in 0u64..=9_999_999_999, cents in 0u64..100) {
        prop_assume!(whole > 0 || cents > 0);
        let text = format!("{whole}.{cents:02}");
        let amount = Amount::parse(&text).expect("valid amount refused");
        prop_assert_eq!(amount.cents() as u64, whole * 100 + cents);
        prop_assert_eq!(amount.to_string(), text.clone());
        let body = format!(r#"{{"user_id":"7d444840-9dc0-11d1-b245-5ffdce74fad2","amount":{text}}}"#);
        let order = parse_new_order(body.as_bytes()).expect("valid body refused");
        prop_assert_eq!(order.amount, amount);
    }
}
