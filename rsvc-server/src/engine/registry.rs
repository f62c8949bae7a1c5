//! The hosted replicas, indexed by (class, instance) and by database id.

use super::*;

/// The hosted replicas, indexed both ways: by class and instance for the client path, and by
/// database id for raft messages, so that routing one costs O(1) however many instances the
/// engine hosts.
#[derive(Default)]
pub(crate) struct Registry {
    by_name: HashMap<(String, String), Arc<Host>>,
    by_db: HashMap<rdb::DbId, Arc<Host>>,
}

impl Registry {
    pub(crate) fn insert(&mut self, host: Arc<Host>) {
        let key = (host.class.clone(), host.instance.clone());
        if let Some(old) = self.by_name.insert(key, host.clone()) {
            self.by_db.remove(&old.db.ident().db);
        }
        self.by_db.insert(host.db.ident().db, host);
    }

    pub(crate) fn remove(&mut self, class: &str, instance: &str) -> Option<Arc<Host>> {
        let host = self.by_name.remove(&(class.to_string(), instance.to_string()))?;
        self.by_db.remove(&host.db.ident().db);
        Some(host)
    }

    pub(crate) fn drain(&mut self) -> Vec<Arc<Host>> {
        self.by_db.clear();
        self.by_name.drain().map(|(_, h)| h).collect()
    }
}

impl Engine {
    /// The hosted replica of `class`/`instance`, if any.
    pub fn host(&self, class: &str, instance: &str) -> Option<Arc<Host>> {
        self.inner
            .hosts
            .read()
            .expect("lock")
            .by_name
            .get(&(class.to_string(), instance.to_string()))
            .cloned()
    }

    /// The hosted replica of database `db`, if any: how a raft message finds its replica.
    pub(crate) fn host_of_db(&self, db: &DbId) -> Option<Arc<Host>> {
        self.inner.hosts.read().expect("lock").by_db.get(db).cloned()
    }

    /// Every hosted replica.
    pub fn hosts(&self) -> Vec<Arc<Host>> {
        self.inner
            .hosts
            .read()
            .expect("lock")
            .by_name
            .values()
            .cloned()
            .collect()
    }
}
