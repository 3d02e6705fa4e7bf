//! Users and roles stored through the typed state, on the in-memory backend.

mod support;

use postern_auth::Error;
use postern_auth::backend::MemoryBackend;
use postern_auth::role::parse_role_file;
use postern_auth::state::State;
use postern_auth::user::{Traits, User};
use support::ManualClock;

fn alice() -> User {
    User {
        name: "alice".into(),
        roles: vec!["dev".into(), "gone".into()],
        traits: Traits {
            db_users: vec!["alice".into()],
            ..Traits::default()
        },
        password_hash: None,
        totp: None,
        totp_last_step: None,
    }
}

// Users are created once, read back, updated and deleted; duplicates and missing users are errors.
#[tokio::test]
async fn user_lifecycle() {
    let state = State::new(MemoryBackend::new(ManualClock::new(1).provider()));
    state.create_user(&alice()).await.unwrap();
    assert!(matches!(
        state.create_user(&alice()).await,
        Err(Error::AlreadyExists { .. })
    ));
    assert_eq!(state.user("alice").await.unwrap(), alice());
    let updated = state
        .update_user("alice", |user| {
            user.traits.db_names.push("app".into());
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(state.user("alice").await.unwrap().traits.db_names, ["app"]);
    assert_eq!(updated.traits.db_names, ["app"]);
    assert_eq!(state.users().await.unwrap().len(), 1);
    state.delete_user("alice").await.unwrap();
    assert!(matches!(
        state.user("alice").await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        state.delete_user("alice").await,
        Err(Error::NotFound { .. })
    ));
}

// Roles from a file are stored, listed, resolved for a user (missing ones skipped) and deleted.
#[tokio::test]
async fn role_lifecycle() {
    let state = State::new(MemoryBackend::new(ManualClock::new(1).provider()));
    let roles = parse_role_file(
        "r.toml",
        "[[role]]\nname = \"dev\"\nallow.db_users = [\"{{internal.db_users}}\"]\n",
    )
    .unwrap();
    assert!(!state.upsert_role(&roles[0]).await.unwrap());
    assert!(
        state.upsert_role(&roles[0]).await.unwrap(),
        "second apply replaces"
    );
    assert_eq!(state.roles().await.unwrap(), roles);
    state.create_user(&alice()).await.unwrap();
    let held = state.roles_of(&alice()).await.unwrap();
    assert_eq!(held, roles, "the deleted role \"gone\" grants nothing");
    state.delete_role("dev").await.unwrap();
    assert!(matches!(
        state.role("dev").await,
        Err(Error::NotFound { .. })
    ));
}
