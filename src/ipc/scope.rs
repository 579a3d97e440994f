//! App tokens on the IPC socket: managing apps (`app_add`, `app_list`, `app_remove`) and what a
//! connection scoped with `app_auth` may ask for.
//!
//! The socket itself is same-user only (mode 0600). A connection that presented an app token
//! is limited to that app's documents (read-only if the token is) and to presence; device,
//! pairing, trust and app management are refused.

use serde_json::{json, Value};

use super::protocol::{ErrorCode, RequestBody};
use crate::apps::{AppError, AppGrant, AppRegistry};

/// Answers the app-management requests (also used by the CLI when no agent runs).
pub fn app_request(apps: &AppRegistry, body: RequestBody) -> Result<Value, (ErrorCode, String)> {
    match body {
        RequestBody::AppAdd {
            name,
            origins,
            prefixes,
            read_only,
        } => {
            let (app, token) = apps
                .add(&name, &origins, &prefixes, read_only)
                .map_err(app_error)?;
            Ok(json!({ "app": app, "token": token }))
        }
        RequestBody::AppList => Ok(json!(apps.list().map_err(app_error)?)),
        RequestBody::AppRemove { name } => {
            if !apps.remove(&name).map_err(app_error)? {
                return Err((
                    ErrorCode::NotFound,
                    format!("no app named {name:?} (`devicelink app list` lists them)"),
                ));
            }
            Ok(json!({ "removed": true }))
        }
        _ => Err((ErrorCode::BadRequest, "not an app request".into())),
    }
}

fn app_error(e: AppError) -> (ErrorCode, String) {
    let code = match e {
        AppError::Store(_) => ErrorCode::Storage,
        _ => ErrorCode::InvalidArgument,
    };
    (code, e.to_string())
}

/// Whether a connection scoped to `grant` may make `body`.
pub(super) fn check(grant: &AppGrant, body: &RequestBody) -> Result<(), (ErrorCode, String)> {
    use RequestBody as R;
    let (doc, write) = match body {
        R::DocList { .. } | R::AppAuth { .. } => return Ok(()),
        R::DocOpen { doc }
        | R::DocGet { doc }
        | R::DocStateVector { doc }
        | R::DocDiff { doc, .. }
        | R::DocSubscribe { doc, .. }
        | R::AwarenessGet { doc }
        | R::AwarenessSubscribe { doc }
        | R::AwarenessSet { doc, .. } => (doc, false),
        R::DocSet { doc, .. }
        | R::DocText { doc, .. }
        | R::DocApply { doc, .. }
        | R::DocDelete { doc } => (doc, true),
        R::DocUnsubscribe { .. } => return Ok(()),
        _ => {
            return Err((
                ErrorCode::Forbidden,
                format!(
                    "this connection is scoped to app {:?}: only its documents and presence",
                    grant.name
                ),
            ))
        }
    };
    let allowed = if write {
        grant.may_write(doc)
    } else {
        grant.may_read(doc)
    };
    if allowed {
        return Ok(());
    }
    let why = if write && grant.may_read(doc) {
        "its token is read-only"
    } else {
        "the document is outside its token's scope"
    };
    Err((
        ErrorCode::Forbidden,
        format!(
            "app {:?} may not {} {doc:?}: {why}",
            grant.name,
            if write { "change" } else { "open" }
        ),
    ))
}
