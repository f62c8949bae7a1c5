//! The management service's typed API, and a [`Locator`] that asks it where instances live.
//!
//! The management service (class `mgmt`, instance `system`) runs on the access-point engines.
//! It keeps the system map (rank → address, state) and the directory of service instances
//! (class, label → replica ranks). Clients start from the access-point addresses only.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::api::ServiceApi;
use crate::client::{ClientConfig, Connections, LocateError, Locator, Replicas, RsvcClient, StaticLocator};
use crate::error::ClientError;

/// The management service's class.
pub const MGMT_CLASS: &str = "mgmt";
/// Its one instance.
pub const MGMT_INSTANCE: &str = "system";

/// An engine as the system map records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankInfo {
    /// The engine's rank.
    pub rank: u32,
    /// Where it listens.
    pub addr: String,
    /// Whether it is taking part.
    pub state: RankState,
}

/// The state of an engine in the system map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RankState {
    /// Joined and eligible for new replicas.
    Up,
    /// Excluded by an operator; gets no new replicas.
    Excluded,
    /// Not answering health checks from the management leader.
    Down,
}

/// A service instance as the directory records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Service class.
    pub class: String,
    /// The instance's label, which is also its id.
    pub label: String,
    /// Its rdb database id.
    pub db: u128,
    /// Replica ranks and their addresses.
    pub replicas: Vec<(u32, String)>,
    /// The generation of the newest replica ever created on each rank: a replica re-created
    /// on a rank (e.g. after its disk was wiped) gets the next one, never an old identity.
    pub gens: Vec<(u32, u32)>,
}

/// Requests to the management service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MgmtRequest {
    /// An engine announces itself (idempotent). An access point also gets a replica of the
    /// management service. The leader refuses an engine of another cluster, one it cannot
    /// reach at `addr`, and a rank that moves to a new address while its engine at the old one
    /// is still alive.
    Join {
        /// The engine's rank.
        rank: u32,
        /// Where the engine is reached (its advertised address).
        addr: String,
        /// Whether the engine is an access point (hosts a management replica).
        access_point: bool,
        /// The joining engine's cluster name.
        cluster: String,
        /// Random per engine process (see the peer `Identify` call).
        incarnation: u64,
    },
    /// The system map.
    SystemMap,
    /// Creates an instance with `replicas` replicas on distinct engines.
    CreateInstance {
        /// The service class (`pool`, ...).
        class: String,
        /// The instance's label.
        label: String,
        /// How many replicas.
        replicas: u32,
    },
    /// Stops and destroys every replica of an instance and forgets it.
    DestroyInstance {
        /// The service class (`pool`, ...).
        class: String,
        /// The instance's label.
        label: String,
    },
    /// Adds a replica on `rank` (learner, then voter), under a new generation.
    AddReplica {
        /// The service class (`pool`, ...).
        class: String,
        /// The instance's label.
        label: String,
        /// The engine to host the new replica.
        rank: u32,
    },
    /// Removes the replica on `rank` from the group and destroys it if its engine answers.
    RemoveReplica {
        /// The service class (`pool`, ...).
        class: String,
        /// The instance's label.
        label: String,
        /// The engine whose replica leaves.
        rank: u32,
    },
    /// Hands the instance's leadership to the replica on `to_rank` (`None`: the most
    /// caught-up one); answers with the instance, whose first replica is then the new leader.
    TransferLeader {
        /// The service class (`pool`, ...).
        class: String,
        /// The instance's label.
        label: String,
        /// The replica to lead next (`None`: the most caught-up one).
        to_rank: Option<u32>,
    },
    /// Catastrophic recovery of an instance whose quorum is lost for good (DAOS's dictate,
    /// etcd's `--force-new-cluster`): the surviving replica on `rank` (`None`: the one with the
    /// longest log) becomes the only voter and leads, the other replicas that still answer are
    /// destroyed, and the directory lists the survivor alone. Refused while a quorum of the
    /// replicas answers or one leads. DANGEROUS: writes the survivor never received are lost.
    Dictate {
        /// The service class (`pool`, ...).
        class: String,
        /// The instance's label.
        label: String,
        /// The survivor (`None`: the one with the longest log).
        rank: Option<u32>,
    },
    /// Where an instance lives.
    Locate {
        /// The service class (`pool`, ...).
        class: String,
        /// The instance's label.
        label: String,
    },
    /// Every instance, optionally of one class.
    ListInstances {
        /// Only instances of this class (`None`: all).
        class: Option<String>,
    },
    /// The management service itself, as an instance: its replicas (the access points that
    /// host it, with their addresses from the system map), their generations and its database
    /// id. Answers [`MgmtResponse::Instance`].
    DescribeSelf,
}

/// Answers of the management service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MgmtResponse {
    /// Done.
    Ok,
    /// The system map.
    Map(Vec<RankInfo>),
    /// One instance.
    Instance(InstanceInfo),
    /// Several instances.
    Instances(Vec<InstanceInfo>),
    /// The rank that leads an instance after a transfer.
    Leader(u32),
    /// An instance after a dictate: its one replica, on `rank`, leads in `term`.
    Dictated {
        /// The instance as the directory now lists it.
        instance: InstanceInfo,
        /// The survivor's rank.
        rank: u32,
        /// The term it leads in.
        term: u64,
    },
}

/// Errors of the management service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MgmtError {
    /// No such instance, named as `class "label"`.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The instance exists already, named as `class "label"`.
    #[error("{0} exists already")]
    Exists(String),
    /// Fewer eligible engines than replicas asked for.
    #[error("{want} replicas wanted but only {have} engines are up")]
    NotEnoughRanks {
        /// Replicas asked for.
        want: u32,
        /// Engines up.
        have: u32,
    },
    /// Starting replicas failed; the ones that started were destroyed again.
    #[error("could not start replicas: {0}")]
    StartFailed(String),
    /// Changing an instance's replicas (add or remove) failed; the directory is unchanged.
    #[error("could not change the replicas: {0}")]
    ChangeFailed(String),
    /// Leadership could not be handed over.
    #[error("could not transfer leadership: {0}")]
    TransferFailed(String),
    /// A joining engine was refused for good: another cluster, or its rank is alive elsewhere.
    /// Retrying cannot help; the engine's configuration must change.
    #[error("join refused: {0}")]
    JoinRefused(String),
    /// A joining engine could not be reached at the address it gave (a wrong `advertise`, a
    /// firewall); it may retry.
    #[error("engine not reachable: {0}")]
    Unreachable(String),
    /// A dictate was refused: the instance has a quorum or a leader, or no survivor answers.
    #[error("dictate refused: {0}")]
    DictateRefused(String),
    /// The survivor could not be made the only voter; the directory is unchanged.
    #[error("dictate failed: {0}")]
    DictateFailed(String),
    /// A bad argument.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Storage trouble.
    #[error("storage: {0}")]
    Storage(String),
    /// The caller may not do this: system administration needs an admin principal (a client
    /// certificate in the admin group), and joining needs the engine certificate of that rank.
    #[error("permission denied: {0}")]
    Denied(String),
}

/// The management service's typed face.
pub struct MgmtApi;

impl ServiceApi for MgmtApi {
    const CLASS: &'static str = MGMT_CLASS;
    type Request = MgmtRequest;
    type Response = MgmtResponse;
    type Error = MgmtError;

    fn is_mutating(req: &MgmtRequest) -> bool {
        matches!(
            req,
            MgmtRequest::Join { .. }
                | MgmtRequest::CreateInstance { .. }
                | MgmtRequest::DestroyInstance { .. }
                | MgmtRequest::AddReplica { .. }
                | MgmtRequest::RemoveReplica { .. }
                | MgmtRequest::Dictate { .. }
        )
    }
}

/// A client of the management service, starting from the access points.
pub fn mgmt_client(access_points: Replicas, conns: Connections, cfg: ClientConfig) -> RsvcClient<MgmtApi> {
    RsvcClient::new(MGMT_INSTANCE, Arc::new(StaticLocator(access_points)), conns, cfg)
}

/// Finds instances through the management service. Each lookup ends by the deadline of the
/// call that needs it.
pub struct MgmtLocator {
    client: RsvcClient<MgmtApi>,
}

impl MgmtLocator {
    /// A locator asking the management service on `access_points`.
    pub fn new(access_points: Replicas, conns: Connections) -> Self {
        MgmtLocator {
            client: mgmt_client(access_points, conns, ClientConfig::default()),
        }
    }
}

#[tonic::async_trait]
impl Locator for MgmtLocator {
    async fn locate(&self, class: &str, instance: &str, deadline: Instant) -> Result<Replicas, LocateError> {
        let req = MgmtRequest::Locate {
            class: class.to_string(),
            label: instance.to_string(),
        };
        match self.client.call_until(&req, deadline).await {
            Ok(MgmtResponse::Instance(i)) => Ok(i.replicas),
            Ok(other) => Err(LocateError::Unavailable(format!("unexpected answer {other:?}"))),
            Err(ClientError::Service(MgmtError::NotFound(what))) => Err(LocateError::NotFound(what)),
            Err(ClientError::Security(why)) => Err(LocateError::Security(why)),
            Err(e) => Err(LocateError::Unavailable(e.to_string())),
        }
    }
}
