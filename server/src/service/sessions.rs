//! `keyserver.v1.SessionService`: a device's Signal sessions, written compare-and-swap.

use keyserver_proto::pb;
use keyserver_proto::pb::session_service_server::SessionService;
use tonic::{Request, Response, Status};

use super::{timestamp, validate};
use crate::auth::caller;
use crate::store::{SessionKey, SessionQuery, Store, StoredSession};

/// The session service over a store.
pub struct SessionApi {
    store: Store,
}

impl SessionApi {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

fn key_message(key: SessionKey) -> pb::SessionKey {
    pb::SessionKey {
        device_id: key.device_id.into_string(),
        peer_user_id: key.peer_user_id.to_string(),
        peer_device_id: key.peer_device_id.into_string(),
    }
}

fn session_message(s: StoredSession) -> pb::Session {
    pb::Session {
        key: Some(key_message(s.key)),
        state: s.state,
        is_initiator: s.is_initiator,
        active: s.active,
        version: s.version,
        last_message_at: s.last_message_at.map(timestamp),
        created_at: Some(timestamp(s.created_at)),
        updated_at: Some(timestamp(s.updated_at)),
    }
}

#[tonic::async_trait]
impl SessionService for SessionApi {
    async fn put_session(
        &self,
        request: Request<pb::PutSessionRequest>,
    ) -> Result<Response<pb::PutSessionResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let key = validate::session_key("key", r.key)?;
        caller.may_write(&key.device_id)?;
        let state = validate::session_state("state", r.state)?;
        let version = self
            .store
            .put_session(
                caller.user_id,
                &key,
                &state,
                r.is_initiator,
                r.expected_version,
            )
            .await?;
        Ok(Response::new(pb::PutSessionResponse { version }))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        let caller = caller(&request)?;
        let key = validate::session_key("key", request.into_inner().key)?;
        let session = self.store.session(caller.user_id, &key).await?;
        Ok(Response::new(pb::GetSessionResponse {
            session: Some(session_message(session)),
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let limit = validate::page_size("page_size", r.page_size)?;
        let query = SessionQuery {
            device_id: validate::device_id("device_id", &r.device_id)?,
            peer_user_id: r
                .peer_user_id
                .map(|u| validate::user_id("peer_user_id", &u))
                .transpose()?,
            include_inactive: r.include_inactive,
            after: validate::page_token("page_token", &r.page_token)?,
            limit,
        };
        let sessions = self.store.sessions(caller.user_id, &query).await?;
        let next_page_token = match sessions.last() {
            Some(last) if sessions.len() == limit as usize => validate::next_page_token(&last.key),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: sessions.into_iter().map(session_message).collect(),
            next_page_token,
        }))
    }

    async fn touch_session(
        &self,
        request: Request<pb::TouchSessionRequest>,
    ) -> Result<Response<pb::TouchSessionResponse>, Status> {
        let caller = caller(&request)?;
        let key = validate::session_key("key", request.into_inner().key)?;
        caller.may_write(&key.device_id)?;
        let at = self.store.touch_session(caller.user_id, &key).await?;
        Ok(Response::new(pb::TouchSessionResponse {
            last_message_at: Some(timestamp(at)),
        }))
    }

    async fn destroy_session(
        &self,
        request: Request<pb::DestroySessionRequest>,
    ) -> Result<Response<pb::DestroySessionResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let key = validate::session_key("key", r.key)?;
        caller.may_write(&key.device_id)?;
        let version = self
            .store
            .destroy_session(caller.user_id, &key, r.expected_version)
            .await?;
        Ok(Response::new(pb::DestroySessionResponse { version }))
    }
}
