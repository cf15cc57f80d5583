//! Who may call what: the one table of RPCs and plain-HTTP routes and the roles they
//! need, and the check of a request's `authorization` header against it.
//!
//! Invariant: every RPC the coordinator serves is in [`RPCS`] or under an
//! [`OPEN_SERVICES`] prefix (a test walks the served descriptors), and every plain-HTTP
//! route (`/metrics`) is in [`HTTP_ROUTES`]; a path in none needs `admin`, so a route added
//! without an entry is closed, not open. gRPC and HTTP paths pass the same check; only
//! the form of a refusal differs (a gRPC status, or HTTP 401/403: [`is_http`]).

use tonic::Status;

use super::tokens::{Role, TokenTable};

/// What an RPC needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// An `admin` token.
    Admin,
    /// A `viewer` or `admin` token.
    Viewer,
    /// A `worker` token.
    Worker,
}

impl Access {
    /// Whether `role` may call an RPC that needs this.
    pub fn allows(self, role: Role) -> bool {
        matches!(
            (self, role),
            (Access::Admin, Role::Admin)
                | (Access::Viewer, Role::Admin | Role::Viewer)
                | (Access::Worker, Role::Worker)
        )
    }

    fn needs(self) -> &'static str {
        match self {
            Access::Admin => "an admin token",
            Access::Viewer => "a viewer or admin token",
            Access::Worker => "a worker token",
        }
    }
}

/// Every RPC of `flotilla.v1` by its HTTP/2 path, with what it needs.
pub const RPCS: &[(&str, Access)] = &[
    ("/flotilla.v1.CoordinatorService/Register", Access::Worker),
    ("/flotilla.v1.CoordinatorService/Session", Access::Worker),
    ("/flotilla.v1.JobService/SubmitJob", Access::Admin),
    ("/flotilla.v1.JobService/CancelJob", Access::Admin),
    ("/flotilla.v1.JobService/GetJob", Access::Viewer),
    ("/flotilla.v1.JobService/ListJobs", Access::Viewer),
    ("/flotilla.v1.JobService/WatchJob", Access::Viewer),
    ("/flotilla.v1.JobService/ListWorkers", Access::Viewer),
    ("/flotilla.v1.JobService/GetStepTimeline", Access::Viewer),
];

/// The plain-HTTP routes on the same port, with what they need. A refusal is an HTTP
/// status (401 without a known token, 403 for the wrong role), not a gRPC one, since an
/// HTTP client such as Prometheus reads only the status line.
pub const HTTP_ROUTES: &[(&str, Access)] = &[(crate::service::metrics::METRICS_PATH, Access::Viewer)];

/// Whether `path` is one of [`HTTP_ROUTES`].
pub fn is_http(path: &str) -> bool {
    HTTP_ROUTES.iter().any(|(route, _)| *route == path)
}

/// Services open to anyone, for probes and tools: health and both reflection versions.
pub const OPEN_SERVICES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// What the RPC or route at `path` needs; `None` for an open service.
pub fn access(path: &str) -> Option<Access> {
    if OPEN_SERVICES.iter().any(|prefix| path.starts_with(prefix)) {
        return None;
    }
    Some(
        RPCS.iter()
            .chain(HTTP_ROUTES)
            .find(|(route, _)| *route == path)
            .map_or(Access::Admin, |(_, access)| *access),
    )
}

/// Checks a request to `path` with its `authorization` header against `tokens`:
/// `UNAUTHENTICATED` without a known bearer token, `PERMISSION_DENIED` for a role the
/// table does not allow. The messages never contain the token.
pub fn check(path: &str, authorization: Option<&[u8]>, tokens: &TokenTable) -> Result<Option<Role>, Status> {
    Ok(authorize(path, authorization, tokens)?.map(|(role, _)| role))
}

/// [`check`], answering the caller's role and its token's digest (who it is to the rate
/// limits); `None` for an open service.
pub fn authorize(
    path: &str,
    authorization: Option<&[u8]>,
    tokens: &TokenTable,
) -> Result<Option<(Role, [u8; 32])>, Status> {
    let Some(access) = access(path) else { return Ok(None) };
    let Some(header) = authorization else {
        return Err(Status::unauthenticated(format!(
            "{path} needs {}: send `authorization: Bearer TOKEN`",
            access.needs()
        )));
    };
    let token = bearer(header).ok_or_else(|| {
        Status::unauthenticated("the authorization header is not `Bearer TOKEN`".to_string())
    })?;
    let (role, digest) = tokens
        .identify(token)
        .ok_or_else(|| Status::unauthenticated("the bearer token is not in the coordinator's token file"))?;
    if access.allows(role) {
        Ok(Some((role, digest)))
    } else {
        Err(Status::permission_denied(format!(
            "a {role} token may not call {path}: it needs {}",
            access.needs()
        )))
    }
}

/// The token of an `authorization: Bearer TOKEN` header (the scheme's case does not
/// matter, as RFC 7235 says).
fn bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tonic::Code;

    use super::*;

    const ADMIN: &str = "admin-token-0123456789";
    const VIEWER: &str = "viewer-token-0123456789";
    const WORKER: &str = "worker-token-0123456789";

    fn table() -> TokenTable {
        TokenTable::parse(Path::new("t"), &format!("admin {ADMIN}\nviewer {VIEWER}\nworker {WORKER}\n"))
            .unwrap()
    }

    #[test]
    fn the_role_table() {
        let tokens = table();
        for (path, access) in RPCS {
            for (role, token) in [(Role::Admin, ADMIN), (Role::Viewer, VIEWER), (Role::Worker, WORKER)] {
                let header = format!("Bearer {token}");
                let result = check(path, Some(header.as_bytes()), &tokens);
                if access.allows(role) {
                    assert_eq!(result.unwrap(), Some(role), "{path} {role}");
                } else {
                    let status = result.unwrap_err();
                    assert_eq!(status.code(), Code::PermissionDenied, "{path} {role}");
                    assert!(!status.message().contains(token));
                }
            }
            let status = check(path, None, &tokens).unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{path}");
        }
        assert!(Access::Viewer.allows(Role::Admin) && !Access::Worker.allows(Role::Admin));
    }

    #[test]
    fn headers_that_are_not_a_known_bearer_token() {
        let tokens = table();
        let path = "/flotilla.v1.JobService/ListJobs";
        for header in [
            format!("Basic {ADMIN}"),
            "Bearer ".to_string(),
            "Bearer".to_string(),
            format!("Bearer {ADMIN}x"),
            ADMIN.to_string(),
        ] {
            let status = check(path, Some(header.as_bytes()), &tokens).unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{header}");
            assert!(!status.message().contains(ADMIN), "{}", status.message());
        }
        assert_eq!(
            check(path, Some(format!("bearer {ADMIN}").as_bytes()), &tokens).unwrap(),
            Some(Role::Admin)
        );
    }

    #[test]
    fn open_services_and_unknown_paths() {
        let tokens = table();
        assert_eq!(check("/grpc.health.v1.Health/Check", None, &tokens).unwrap(), None);
        assert_eq!(
            check("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", None, &tokens).unwrap(),
            None
        );
        let header = format!("Bearer {VIEWER}");
        let status = check("/flotilla.v1.JobService/Drain", Some(header.as_bytes()), &tokens).unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(access("/grpc.health.v1.Healthy/Check"), Some(Access::Admin));
    }

    #[test]
    fn metrics_needs_a_viewer_or_an_admin() {
        let tokens = table();
        assert!(is_http("/metrics") && !is_http("/metrics/") && !is_http("/flotilla.v1.JobService/GetJob"));
        for (token, allowed) in [(ADMIN, true), (VIEWER, true), (WORKER, false)] {
            let header = format!("Bearer {token}");
            let result = check("/metrics", Some(header.as_bytes()), &tokens);
            assert_eq!(result.is_ok(), allowed, "{token}");
            if !allowed {
                assert_eq!(result.unwrap_err().code(), Code::PermissionDenied);
            }
        }
        assert_eq!(check("/metrics", None, &tokens).unwrap_err().code(), Code::Unauthenticated);
    }
}
