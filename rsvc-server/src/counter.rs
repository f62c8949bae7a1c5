//! A small but complete replicated service: named counters. It is the worked example of
//! `docs/writing-a-service.md`, and the service that the engine binary and the cluster tests
//! host.

use async_trait::async_trait;
use rdb::{KeyClass, Path, Tx};
use rsvc_client::ServiceApi;
use serde::{Deserialize, Serialize};

use crate::service::{Ctx, ReplicatedService, ServiceError};

/// What clients send.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum CounterRequest {
    /// Adds `delta` to counter `name` (created at 0) and returns the new value.
    Add {
        /// The counter.
        name: String,
        /// What to add (may be negative).
        delta: i64,
    },
    /// Reads counter `name`.
    Get {
        /// The counter.
        name: String,
    },
    /// Lists every counter.
    List,
}

/// What the service answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CounterResponse {
    /// A counter's value.
    Value(i64),
    /// All counters, by name.
    All(Vec<(String, i64)>),
}

/// The service's own errors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CounterError {
    /// `Get` of a counter that does not exist.
    #[error("no counter named {0:?}")]
    NoSuchCounter(String),
    /// The addition would overflow.
    #[error("counter {0:?} would overflow")]
    Overflow(String),
    /// Storage trouble (retryable at the framework level).
    #[error("storage: {0}")]
    Storage(String),
}

/// The typed face of the service.
pub struct CounterApi;

impl ServiceApi for CounterApi {
    const CLASS: &'static str = "counter";
    type Request = CounterRequest;
    type Response = CounterResponse;
    type Error = CounterError;

    fn is_mutating(req: &CounterRequest) -> bool {
        matches!(req, CounterRequest::Add { .. })
    }
}

/// One replica's service value. It keeps no state outside rdb, so it needs no hooks.
#[derive(Default)]
pub struct Counter;

fn counters() -> Path {
    Path::root().child("counters")
}

fn storage(e: rdb::Error) -> CounterError {
    CounterError::Storage(e.to_string())
}

fn decode(b: &[u8]) -> Result<i64, CounterError> {
    Ok(i64::from_be_bytes(
        b.try_into()
            .map_err(|_| CounterError::Storage("corrupt counter".into()))?,
    ))
}

#[async_trait]
impl ReplicatedService for Counter {
    type Api = CounterApi;

    async fn bootstrap(&self, tx: &mut Tx) -> Result<(), ServiceError> {
        tx.create_kvs(&Path::root(), "counters", KeyClass::Lexical);
        Ok(())
    }

    async fn handle(&self, ctx: &mut Ctx, req: CounterRequest) -> Result<CounterResponse, CounterError> {
        match req {
            CounterRequest::Add { name, delta } => {
                let old = ctx
                    .tx
                    .lookup(&counters(), name.as_bytes())
                    .await
                    .map_err(storage)?;
                let cur = old.as_deref().map(decode).transpose()?.unwrap_or(0);
                let new = cur
                    .checked_add(delta)
                    .ok_or_else(|| CounterError::Overflow(name.clone()))?;
                // NB: read-modify-write under concurrency. The precondition makes the commit
                // fail if another Add changed the counter since we read it; the engine then
                // answers Busy, nothing was applied, and the client retries the same request.
                ctx.tx.expect(&counters(), name.clone().into_bytes(), old);
                ctx.tx
                    .update(&counters(), name.into_bytes(), new.to_be_bytes().to_vec());
                Ok(CounterResponse::Value(new))
            }
            CounterRequest::Get { name } => match ctx
                .tx
                .lookup(&counters(), name.as_bytes())
                .await
                .map_err(storage)?
            {
                Some(b) => Ok(CounterResponse::Value(decode(&b)?)),
                None => Err(CounterError::NoSuchCounter(name)),
            },
            CounterRequest::List => {
                let all = ctx
                    .tx
                    .iterate(&counters(), .., usize::MAX)
                    .await
                    .map_err(storage)?;
                let mut out = Vec::with_capacity(all.len());
                for (k, v) in all {
                    if let rdb::Value::Bytes(b) = v {
                        out.push((String::from_utf8_lossy(&k).into_owned(), decode(&b)?));
                    }
                }
                Ok(CounterResponse::All(out))
            }
        }
    }
}
