//! Nodes that prove who they are with Kubernetes' own credentials: the agent pod's projected
//! service account token, checked with a `TokenReview`. The token must be valid for the
//! audience, belong to the agent's service account, and be bound to a pod that exists (same
//! uid), is not being deleted, and runs on the node the agent claims to be.
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{api::PostParams, Api, Client};

/// The pod claims a bound service account token carries (and TokenReview returns as extras).
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// How long one review (the TokenReview and the Pod read) may take: a join waits for it, and a
/// slow or stuck API server must not hold joins (and their connections) for ever.
pub const REVIEW_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NodeAuthError {
    #[error("the Kubernetes API could not review the token: {0}")]
    Api(#[source] kube::Error),
    #[error("the Kubernetes API did not review the token within {0:?}; the agent retries")]
    Timeout(std::time::Duration),
    #[error("the token is not valid: {0}")]
    NotAuthenticated(String),
    #[error("the token is not for audience {0:?}")]
    Audience(String),
    #[error("the token is of {got:?}, not of the agent's service account {want:?}")]
    ServiceAccount { got: String, want: String },
    #[error("the token is not bound to a pod (a projected token is needed, not a legacy secret)")]
    NotBound,
    #[error("the pod {0} the token is bound to no longer exists")]
    PodGone(String),
    #[error(
        "the pod {pod} the token is bound to was replaced (uid {got}, the token names {want})"
    )]
    PodReplaced {
        pod: String,
        got: String,
        want: String,
    },
    #[error("the pod {0} the token is bound to is being deleted")]
    PodDeleting(String),
    #[error("the pod {pod} runs on node {runs_on:?}, not on {claimed:?}")]
    WrongNode {
        pod: String,
        runs_on: String,
        claimed: String,
    },
}

/// Reviews agents' tokens.
#[derive(Clone)]
pub struct TokenReviewer {
    pub client: Client,
    /// `namespace/name` of the agent's service account.
    pub namespace: String,
    pub service_account: String,
    pub audience: String,
    /// At most this for one review ([`REVIEW_DEADLINE`]).
    pub deadline: std::time::Duration,
}

impl TokenReviewer {
    /// Checks `token` for an agent that says it is `node`, within the deadline.
    pub async fn check(&self, token: &str, node: &str) -> Result<(), NodeAuthError> {
        tokio::time::timeout(self.deadline, self.review(token, node))
            .await
            .unwrap_or(Err(NodeAuthError::Timeout(self.deadline)))
    }

    async fn review(&self, token: &str, node: &str) -> Result<(), NodeAuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(NodeAuthError::Api)?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(NodeAuthError::NotAuthenticated(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.contains(&self.audience))
        {
            return Err(NodeAuthError::Audience(self.audience.clone()));
        }
        let user = status.user.unwrap_or_default();
        let want = format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        );
        let got = user.username.unwrap_or_default();
        if got != want {
            return Err(NodeAuthError::ServiceAccount { got, want });
        }
        let extra = user.extra.unwrap_or_default();
        let claim = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (claim(POD_NAME), claim(POD_UID)) else {
            return Err(NodeAuthError::NotBound);
        };
        let pod_ref = format!("{}/{pod_name}", self.namespace);
        let pod = Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .get_opt(&pod_name)
            .await
            .map_err(NodeAuthError::Api)?
            .ok_or_else(|| NodeAuthError::PodGone(pod_ref.clone()))?;
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if uid != pod_uid {
            return Err(NodeAuthError::PodReplaced {
                pod: pod_ref,
                got: uid,
                want: pod_uid,
            });
        }
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(NodeAuthError::PodDeleting(pod_ref));
        }
        let runs_on = pod.spec.and_then(|s| s.node_name).unwrap_or_default();
        if runs_on != node {
            return Err(NodeAuthError::WrongNode {
                pod: pod_ref,
                runs_on,
                claimed: node.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stuck_api_server_fails_the_review_at_the_deadline() {
        // An API server that takes connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                open.push(conn);
            }
        });
        let url: http::Uri = format!("http://{addr}").parse().expect("url");
        let client = Client::try_from(kube::Config::new(url)).expect("client");
        let reviewer = TokenReviewer {
            client,
            namespace: "meshlet-system".into(),
            service_account: "meshlet-agent".into(),
            audience: "meshlet".into(),
            deadline: std::time::Duration::from_millis(300),
        };
        let started = std::time::Instant::now();
        let result = reviewer.check("token", "node-1").await;
        assert!(
            matches!(result, Err(NodeAuthError::Timeout(_))),
            "{result:?}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        held.abort();
    }
}
