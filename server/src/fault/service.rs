//! The injecting service: a [`BitsService`] with a fault plan applied around it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;

use super::facts::Facts;
use super::firing::{Fired, PlanState, RuleState, SplitMix64};
use super::plan::{FaultPacket, FaultPlan, FaultPlanError};
use super::record::Recorder;
use super::response_body::FaultResponseBody;
use crate::service::BoxError;
use crate::transcript::Transcript;
use crate::BitsService;

/// The error of a request whose fault closes the connection: hyper drops the connection
/// without an answer.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by fault rule {rule}")]
pub struct ConnectionDropped {
    /// The rule that fired.
    pub rule: String,
}

/// A [`BitsService`] with a fault plan applied and, optionally, a transcript recorded. Cheap to
/// clone; every clone shares the plan's counters and the transcript.
#[derive(Clone)]
pub struct FaultInjectingService {
    pub(super) inner: BitsService,
    pub(super) plan: Arc<FaultPlan>,
    pub(super) state: Arc<Mutex<PlanState>>,
    pub(super) transcript: Option<Transcript>,
}

impl fmt::Debug for FaultInjectingService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultInjectingService")
            .field("plan", &self.plan)
            .field("transcript", &self.transcript)
            .finish_non_exhaustive()
    }
}

pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl FaultInjectingService {
    /// Wraps `inner` with `plan` (checked here), recording into `transcript` if given.
    pub fn new(
        inner: BitsService,
        plan: FaultPlan,
        transcript: Option<Transcript>,
    ) -> Result<Self, FaultPlanError> {
        plan.validate().map_err(FaultPlanError)?;
        let rules = (0..plan.rules.len() as u64)
            .map(|i| RuleState {
                fired: 0,
                rng: SplitMix64(plan.seed ^ (i + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)),
            })
            .collect();
        Ok(FaultInjectingService {
            inner,
            plan: Arc::new(plan),
            state: Arc::new(Mutex::new(PlanState {
                counts: Default::default(),
                rules,
            })),
            transcript,
        })
    }

    /// The wrapped service.
    pub fn inner(&self) -> &BitsService {
        &self.inner
    }

    /// The plan.
    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    /// The transcript, if one is recorded.
    pub fn transcript(&self) -> Option<&Transcript> {
        self.transcript.as_ref()
    }

    /// Serves one request with the plan applied.
    pub async fn handle<B>(
        &self,
        req: Request<B>,
    ) -> Result<Response<FaultResponseBody>, ConnectionDropped>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let seq = self.transcript.as_ref().map_or(0, Transcript::next_seq);
        let facts = Facts::of(&req, seq, self.transcript.is_some());
        let fired = self.decide(&facts);
        let ends = matches!(
            facts.packet,
            Some(FaultPacket::CloseSession | FaultPacket::CancelSession)
        )
        .then(|| facts.session_key.clone())
        .flatten();
        let result = self.serve(req, facts, fired).await;
        if let (Some(session), Ok(res)) = (&ends, &result) {
            if res.status().is_success() {
                self.session_ended(session);
            }
        }
        // The transcript file has the request's line before its answer goes out.
        if let Some(t) = &self.transcript {
            t.written().await;
        }
        result
    }

    async fn serve<B>(
        &self,
        req: Request<B>,
        facts: Facts,
        fired: Option<Fired>,
    ) -> Result<Response<FaultResponseBody>, ConnectionDropped>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        // Records the request when it is answered, or, if hyper drops this future because the
        // client went away first, when it is dropped.
        let mut rec = Recorder {
            svc: self.clone(),
            facts,
            fired: fired.clone(),
            produced: None,
            armed: true,
        };
        let Some(fired) = fired else {
            let res = self.inner.handle(req).await;
            return Ok(rec.answer(res, None));
        };
        tracing::info!(
            fault = %fired.label,
            packet = %rec.facts.label,
            session = rec.facts.session_text.as_deref().unwrap_or(""),
            "fault injected"
        );
        self.apply(fired, req, rec).await
    }

    /// Removes the request's session (purged like the session timeout does).
    pub(super) async fn remove(&self, facts: &Facts) -> bool {
        let Some(id) = facts.session_id else {
            return false;
        };
        match self.inner.remove_session(&id).await {
            Ok(removed) => removed,
            Err(e) => {
                tracing::error!(error = %e, session = %id, "fault: removing the session failed");
                false
            }
        }
    }
}

type FaultFuture =
    Pin<Box<dyn Future<Output = Result<Response<FaultResponseBody>, ConnectionDropped>> + Send>>;

impl<B> hyper::service::Service<Request<B>> for FaultInjectingService
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<FaultResponseBody>;
    type Error = ConnectionDropped;
    type Future = FaultFuture;

    fn call(&self, req: Request<B>) -> Self::Future {
        let svc = self.clone();
        Box::pin(async move { svc.handle(req).await })
    }
}

impl<B> tower_service::Service<Request<B>> for FaultInjectingService
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<FaultResponseBody>;
    type Error = ConnectionDropped;
    type Future = FaultFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        hyper::service::Service::call(&*self, req)
    }
}
