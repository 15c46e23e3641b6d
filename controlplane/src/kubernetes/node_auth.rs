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

#[derive(Debug, thiserror::Error)]
pub enum NodeAuthError {
    #[error("the Kubernetes API could not review the token: {0}")]
    Api(#[source] kube::Error),
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
}

impl TokenReviewer {
    /// Checks `token` for an agent that says it is `node`.
    pub async fn check(&self, token: &str, node: &str) -> Result<(), NodeAuthError> {
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
