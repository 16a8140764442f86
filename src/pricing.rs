//! What a request costs, in integer micro-dollars.
//!
//! Prices are configured per million tokens in USD and converted exactly to
//! micro-dollars per million tokens ([`crate::config::usd_to_micros`]). A
//! request's cost is
//!
//! ```text
//! ceil((input_tokens × input_micros_per_mtok + output_tokens × output_micros_per_mtok) / 1 000 000)
//! ```
//!
//! computed in 128-bit integers: the fractions of both directions are added
//! before rounding, and the one rounding goes up, so a request that used any
//! priced token never costs zero and budgets are never undercounted.

use crate::config::{usd_to_micros, ModelConfig};

/// A model's prices in micro-dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    pub input_micros_per_mtok: i64,
    pub output_micros_per_mtok: i64,
}

impl Price {
    /// The prices of a validated model configuration.
    pub fn of(model: &ModelConfig) -> Price {
        Price {
            input_micros_per_mtok: usd_to_micros(model.input_usd_per_mtok).unwrap_or(0),
            output_micros_per_mtok: usd_to_micros(model.output_usd_per_mtok).unwrap_or(0),
        }
    }

    pub fn cost_micros(&self, input_tokens: i64, output_tokens: i64) -> i64 {
        let total = i128::from(input_tokens.max(0)) * i128::from(self.input_micros_per_mtok)
            + i128::from(output_tokens.max(0)) * i128::from(self.output_micros_per_mtok);
        let cost = (total + 999_999) / 1_000_000;
        i64::try_from(cost).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input_usd: f64, output_usd: f64) -> Price {
        Price::of(&ModelConfig {
            name: "m".into(),
            provider: "p".into(),
            upstream_model: None,
            input_usd_per_mtok: input_usd,
            output_usd_per_mtok: output_usd,
            fallbacks: Vec::new(),
        })
    }

    #[test]
    fn whole_micro_dollar_costs_are_exact() {
        // 1M input tokens at $0.15 and 2M output at $0.60: $1.35.
        assert_eq!(
            price(0.15, 0.60).cost_micros(1_000_000, 2_000_000),
            1_350_000
        );
        // 100 input tokens at $0.15/M = 15 micro-dollars exactly.
        assert_eq!(price(0.15, 0.0).cost_micros(100, 0), 15);
    }

    #[test]
    fn fractions_of_both_directions_add_up_before_one_rounding_up() {
        // 3 × 0.15 = 0.45 µ$ and 1 × 0.60 = 0.60 µ$: 1.05 µ$ → 2.
        assert_eq!(price(0.15, 0.60).cost_micros(3, 1), 2);
        // 1 × 0.15 µ$ → 1: a used priced token never costs zero.
        assert_eq!(price(0.15, 0.60).cost_micros(1, 0), 1);
        // Exactly 1.0 µ$ is not rounded up to 2.
        assert_eq!(price(1.0, 0.0).cost_micros(1, 0), 1);
    }

    #[test]
    fn free_models_and_empty_requests_cost_nothing() {
        assert_eq!(price(0.0, 0.0).cost_micros(1_000, 1_000), 0);
        assert_eq!(price(0.15, 0.60).cost_micros(0, 0), 0);
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        assert_eq!(price(1_000.0, 0.0).cost_micros(i64::MAX, 0), i64::MAX);
    }
}
