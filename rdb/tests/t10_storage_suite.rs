//! openraft's own storage conformance suite, run against rdb's redb-backed stores.

use openraft::testing::log::{StoreBuilder, Suite};
use rdb::testing::{stores, LogStore, SmStore, TypeConfig};
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, SmStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, SmStore), openraft::StorageError<TypeConfig>> {
        let dir = TempDir::new().expect("tempdir");
        let (log, sm) = stores(dir.path());
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn openraft_storage_suite() {
    Suite::test_all(Builder)
        .await
        .expect("rdb stores pass openraft's storage suite");
}
