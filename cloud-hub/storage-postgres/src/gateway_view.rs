//! `GatewayViewStore` on PostgreSQL: not implemented yet. Fails with
//! `StoreError::Unsupported` (the dashboard answers 501), never a silent
//! empty view; an expected failure of the conformance suite here.

use hub_storage::{GatewayActivity, GatewayViewStore, StoreError};

use crate::PgStore;

impl GatewayViewStore for PgStore {
    fn gateway_activity(
        &self,
        _since_us: i64,
        _max_batches: u32,
    ) -> Result<Vec<GatewayActivity>, StoreError> {
        Err(StoreError::Unsupported("the gateways view", "postgres"))
    }
}
