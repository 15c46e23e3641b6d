//! The node-local pod API (gRPC on a unix socket): the CNI side, or the lab, announces pods.
use std::{path::Path, sync::Arc};

use meshlet_proto::v1::{
    node_service_server::NodeService, AddPodRequest, AddPodResponse, ListPodsRequest,
    ListPodsResponse, PodStatus, RemovePodRequest, RemovePodResponse,
};
use tonic::{Request, Response, Status};

use crate::pods::{PodError, PodRegistry};

pub struct NodeApi {
    pub pods: Arc<PodRegistry>,
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn add_pod(
        &self,
        request: Request<AddPodRequest>,
    ) -> Result<Response<AddPodResponse>, Status> {
        let req = request.into_inner();
        match self.pods.add(&req.uid, Path::new(&req.netns_path)).await {
            Ok(netns_cookie) => Ok(Response::new(AddPodResponse { netns_cookie })),
            Err(e) => {
                tracing::error!("pod not added: {e}");
                Err(match e {
                    PodError::EmptyUid => Status::invalid_argument(e.to_string()),
                    PodError::Conflict { .. } => Status::already_exists(e.to_string()),
                    PodError::InProgress { .. } | PodError::HandingOver { .. } => {
                        Status::unavailable(e.to_string())
                    }
                    PodError::Netns { .. } => Status::not_found(e.to_string()),
                    _ => Status::internal(e.to_string()),
                })
            }
        }
    }

    async fn remove_pod(
        &self,
        request: Request<RemovePodRequest>,
    ) -> Result<Response<RemovePodResponse>, Status> {
        let uid = request.into_inner().uid;
        if self.pods.remove(&uid) {
            Ok(Response::new(RemovePodResponse {}))
        } else {
            Err(Status::not_found(format!("no pod {uid:?} on this node")))
        }
    }

    async fn list_pods(
        &self,
        _request: Request<ListPodsRequest>,
    ) -> Result<Response<ListPodsResponse>, Status> {
        let pods = self
            .pods
            .list()
            .into_iter()
            .map(|p| PodStatus {
                uid: p.uid,
                netns_path: p.netns_path,
                netns_cookie: p.netns_cookie,
                workload: p.workload.unwrap_or_default(),
                identity: p.identity.unwrap_or_default(),
                certificate_ready: p.certificate_ready,
            })
            .collect();
        Ok(Response::new(ListPodsResponse { pods }))
    }
}
