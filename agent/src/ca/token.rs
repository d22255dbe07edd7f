//! The Kubernetes node proof of the identity service (`strait ca serve --kubernetes`): an agent
//! without a node certificate sends a projected ServiceAccount token bound to its own pod
//! (audience [`AUDIENCE`]) as `authorization: Bearer <token>`, and the service finds its node:
//!
//! 1. a TokenReview (`authentication.k8s.io/v1`, `spec.audiences: [strait-ca]`) must say
//!    `authenticated`, with `strait-ca` among `status.audiences` (an empty list would mean the
//!    API server's own audience: a token for the API, not for this service);
//! 2. the user must be the agent's ServiceAccount (`--agent-service-account`), and the token
//!    bound to a pod: `user.extra` `authentication.kubernetes.io/pod-name` and `pod-uid`, which
//!    the API server adds for a token of a pod's projected volume;
//! 3. that pod, read from the API, must still have that UID, run as that ServiceAccount, carry
//!    the agent's labels (`--agent-pod-labels`) and not have finished; its `spec.nodeName` is
//!    the node.
//!
//! So a workload pod, whatever its labels, cannot pass for an agent (it does not run as the
//! agent's ServiceAccount), and an agent's token names the node its pod was scheduled on, not
//! one it chooses. docs/identity.md describes the protocol.

use hyper::StatusCode;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

use crate::kubernetes::endpoints::AgentLabels;

/// The audience an agent's token must be issued for.
pub const AUDIENCE: &str = "strait-ca";

/// What the API server puts in `user.extra` for a token bound to a pod.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Which pods are strait agents.
#[derive(Debug, Clone)]
pub struct AgentPods {
    /// `namespace/name` of the agents' ServiceAccount.
    pub service_account: String,
    pub labels: AgentLabels,
}

/// A refusal: the HTTP status, the metric's reason, the message.
pub type Refused = (StatusCode, &'static str, String);

fn bad_token(message: String) -> Refused {
    (StatusCode::FORBIDDEN, "bad_token", message)
}

fn not_agent(message: String) -> Refused {
    (StatusCode::FORBIDDEN, "not_agent", message)
}

/// Parses `--agent-service-account`: `namespace/name`.
pub fn parse_service_account(s: &str) -> Result<String, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(s.to_owned())
        }
        _ => Err(format!(
            "`{s}`: expected NAMESPACE/NAME of the agents' ServiceAccount, like strait-system/strait"
        )),
    }
}

/// The node whose agent's pod `token` is bound to (see the module docs).
pub async fn node_of(
    client: &kube::Client,
    token: &str,
    agents: &AgentPods,
) -> Result<String, Refused> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![AUDIENCE.to_owned()]),
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!(
                    "cannot review the token with the Kubernetes API ({e}); the service needs \
                     `create` on tokenreviews (deploy/identity-service.yaml)"
                ),
            )
        })?;
    let bound = check_review(reviewed.status.unwrap_or_default(), agents)?;
    let pod = Api::<Pod>::namespaced(client.clone(), &bound.namespace)
        .get_opt(&bound.pod_name)
        .await
        .map_err(|e| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!(
                    "cannot read the agent pod {}/{}: {e}",
                    bound.namespace, bound.pod_name
                ),
            )
        })?;
    check_pod(&bound, pod, agents)
}

/// What a review says the token is bound to.
#[derive(Debug, PartialEq, Eq)]
struct Bound {
    namespace: String,
    account: String,
    pod_name: String,
    pod_uid: String,
}

/// Steps 1 and 2 of the module docs, on the review's status.
fn check_review(status: TokenReviewStatus, agents: &AgentPods) -> Result<Bound, Refused> {
    if status.authenticated != Some(true) {
        return Err(bad_token(format!(
            "the Kubernetes API did not authenticate the token ({}): an agent sends the \
             projected ServiceAccount token of its own pod, with audience {AUDIENCE}",
            status.error.as_deref().unwrap_or("no reason given")
        )));
    }
    let audiences = status.audiences.unwrap_or_default();
    if !audiences.iter().any(|a| a == AUDIENCE) {
        return Err(bad_token(format!(
            "the token is valid for {audiences:?}, not for {AUDIENCE}: project the agent's \
             token with `audience: {AUDIENCE}`"
        )));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let (namespace, account) = agents.service_account.split_once('/').unwrap_or(("", ""));
    if username != format!("system:serviceaccount:{namespace}:{account}") {
        return Err(not_agent(format!(
            "the token is {username}'s, not the agents' ServiceAccount {}",
            agents.service_account
        )));
    }
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    let (Some(pod_name), Some(pod_uid)) = (first(EXTRA_POD_NAME), first(EXTRA_POD_UID)) else {
        return Err(not_agent(
            "the token is bound to no pod (a token from a Secret or a TokenRequest without a \
             pod): an agent sends the projected token of its own pod"
                .into(),
        ));
    };
    Ok(Bound {
        namespace: namespace.to_owned(),
        account: account.to_owned(),
        pod_name,
        pod_uid,
    })
}

/// Step 3 of the module docs: the node of the token's pod, as read from the API (None: gone).
fn check_pod(bound: &Bound, pod: Option<Pod>, agents: &AgentPods) -> Result<String, Refused> {
    let Bound {
        namespace,
        account,
        pod_name,
        pod_uid,
    } = bound;
    let pod =
        pod.ok_or_else(|| not_agent(format!("the token's pod {namespace}/{pod_name} is gone")))?;
    if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
        return Err(not_agent(format!(
            "the token's pod {namespace}/{pod_name} was replaced (UID {pod_uid} is gone)"
        )));
    }
    let spec = pod.spec.unwrap_or_default();
    if spec.service_account_name.as_deref() != Some(account.as_str()) {
        return Err(not_agent(format!(
            "pod {namespace}/{pod_name} does not run as {}",
            agents.service_account
        )));
    }
    let labels = pod.metadata.labels.unwrap_or_default();
    if !agents.labels.select(&labels) {
        return Err(not_agent(format!(
            "pod {namespace}/{pod_name} lacks the agent's labels (--agent-pod-labels)"
        )));
    }
    let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
    if phase == "Succeeded" || phase == "Failed" {
        return Err(not_agent(format!(
            "pod {namespace}/{pod_name} has finished ({phase})"
        )));
    }
    spec.node_name.filter(|n| !n.is_empty()).ok_or_else(|| {
        not_agent(format!(
            "pod {namespace}/{pod_name} is not scheduled on a node"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agents() -> AgentPods {
        AgentPods {
            service_account: "strait-system/strait".into(),
            labels: crate::kubernetes::endpoints::DEFAULT_AGENT_LABELS
                .parse()
                .unwrap(),
        }
    }

    /// A review of a token of the agent pod `strait-x` (UID `u1`), as kube-apiserver answers.
    fn review() -> TokenReviewStatus {
        serde_json::from_value(serde_json::json!({
            "authenticated": true,
            "audiences": ["strait-ca"],
            "user": {
                "username": "system:serviceaccount:strait-system:strait",
                "extra": {
                    "authentication.kubernetes.io/pod-name": ["strait-x"],
                    "authentication.kubernetes.io/pod-uid": ["u1"],
                },
            },
        }))
        .unwrap()
    }

    fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "strait-x", "namespace": "strait-system", "uid": "u1",
                         "labels": {"app.kubernetes.io/name": "strait"}},
            "spec": {"nodeName": "node1", "serviceAccountName": "strait",
                     "containers": [{"name": "agent"}]},
            "status": {"phase": "Running"},
        }))
        .unwrap()
    }

    fn reason(result: Result<impl std::fmt::Debug, Refused>) -> &'static str {
        result.unwrap_err().1
    }

    #[test]
    fn a_bound_agent_token_names_its_pods_node() {
        let bound = check_review(review(), &agents()).unwrap();
        assert_eq!(bound.pod_name, "strait-x");
        assert_eq!(check_pod(&bound, Some(pod()), &agents()).unwrap(), "node1");
    }

    #[test]
    fn reviews_that_do_not_prove_an_agent_are_refused() {
        let mut r = review();
        r.authenticated = None;
        r.error = Some("invalid bearer token".into());
        assert_eq!(reason(check_review(r, &agents())), "bad_token");
        // No audience back means the API server's own: a token for the API, not for us.
        for audiences in [
            None,
            Some(vec![]),
            Some(vec!["https://kubernetes.default.svc".into()]),
        ] {
            let mut r = review();
            r.audiences = audiences;
            assert_eq!(reason(check_review(r, &agents())), "bad_token");
        }
        let mut r = review();
        r.user.as_mut().unwrap().username = Some("system:serviceaccount:app:default".into());
        assert_eq!(reason(check_review(r, &agents())), "not_agent");
        let mut r = review();
        r.user.as_mut().unwrap().extra = None;
        assert_eq!(reason(check_review(r, &agents())), "not_agent");
    }

    #[test]
    fn the_tokens_pod_must_still_be_that_agent_pod() {
        let bound = check_review(review(), &agents()).unwrap();
        let check = |change: fn(&mut Pod)| {
            let mut p = pod();
            change(&mut p);
            reason(check_pod(&bound, Some(p), &agents()))
        };
        assert_eq!(reason(check_pod(&bound, None, &agents())), "not_agent");
        assert_eq!(check(|p| p.metadata.uid = Some("u2".into())), "not_agent");
        assert_eq!(
            check(|p| p.spec.as_mut().unwrap().service_account_name = Some("default".into())),
            "not_agent"
        );
        assert_eq!(check(|p| p.metadata.labels = None), "not_agent");
        assert_eq!(
            check(|p| p.status.as_mut().unwrap().phase = Some("Failed".into())),
            "not_agent"
        );
        assert_eq!(
            check(|p| p.spec.as_mut().unwrap().node_name = None),
            "not_agent"
        );
    }

    #[test]
    fn the_service_account_flag_is_namespace_and_name() {
        assert!(parse_service_account("strait-system/strait").is_ok());
        for bad in ["strait", "/strait", "ns/", "a/b/c"] {
            assert!(parse_service_account(bad).is_err(), "{bad}");
        }
    }
}
