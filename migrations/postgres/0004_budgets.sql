-- Spend per budget per period. One row per (budget, counter, period); a new
-- period is a new row. The counter is a key id, or 'global'.
CREATE TABLE budget_state (
    budget        TEXT   NOT NULL,
    scope_key     TEXT   NOT NULL,
    period_start  BIGINT NOT NULL,
    spent_micros  BIGINT NOT NULL,
    PRIMARY KEY (budget, scope_key, period_start)
);
CREATE INDEX budget_state_period ON budget_state (period_start);

-- A key's own budget (tollgate keys create --budget-usd X --budget-period P).
ALTER TABLE api_keys ADD COLUMN budget_micros BIGINT;
ALTER TABLE api_keys ADD COLUMN budget_period TEXT;
