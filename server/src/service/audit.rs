//! `keyserver.v1.AuditService`: a user reads their own audit trail.

use keyserver_proto::pb;
use keyserver_proto::pb::audit_service_server::AuditService;
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use super::{timestamp, validate};
use crate::auth::caller;
use crate::store::{AuditEvent, AuditQuery, Store};

/// The audit service over a store.
pub struct AuditApi {
    store: Store,
}

impl AuditApi {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

fn time(field: &str, t: Option<prost_types::Timestamp>) -> Result<Option<OffsetDateTime>, Status> {
    t.map(|t| {
        OffsetDateTime::from_unix_timestamp(t.seconds)
            .ok()
            .and_then(|at| {
                at.replace_nanosecond(t.nanos.clamp(0, 999_999_999) as u32)
                    .ok()
            })
            .ok_or_else(|| validate::invalid(field, "not a representable time").into())
    })
    .transpose()
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let event_types = r
            .event_types
            .iter()
            .enumerate()
            .map(|(i, name)| {
                AuditEvent::from_name(name).ok_or_else(|| {
                    Status::from(validate::invalid(
                        format!("event_types[{i}]"),
                        format!("{name:?} is not an audit event type"),
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        let limit = validate::page_size("page_size", r.page_size)?;
        let before_id = match r.page_token.as_str() {
            "" => None,
            token => Some(token.parse::<u64>().map_err(|_| {
                Status::from(validate::invalid(
                    "page_token",
                    "is not a token this server returned",
                ))
            })?),
        };
        let query = AuditQuery {
            event_types,
            since: time("since", r.since)?,
            until: time("until", r.until)?,
            before_id,
            limit,
        };
        let events = self.store.audit_events(caller.user_id, &query).await?;
        let next_page_token = match events.last() {
            Some(last) if events.len() == limit as usize => last.id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: events
                .into_iter()
                .map(|e| pb::AuditEvent {
                    id: e.id,
                    event_type: e.event_type,
                    device_id: e.device_id,
                    metadata_json: e.metadata.to_string(),
                    created_at: Some(timestamp(e.created_at)),
                })
                .collect(),
            next_page_token,
        }))
    }
}
