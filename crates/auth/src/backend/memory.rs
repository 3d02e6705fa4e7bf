//! The in-memory backend, for tests and simulation: a sorted map behind a mutex.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::time_provider::TimeProvider;
use tokio::sync::broadcast;

use super::{
    Backend, Event, Expect, Item, LIST_ITEMS_MAX, Notice, Revision, WATCH_EVENTS_MAX, Watcher,
    check_key, check_prefix, check_value, expiry_secs, now_secs, unix_time,
};
use crate::Error;

/// State in a `BTreeMap`, gone when the last handle is dropped.
///
/// Every operation completes without awaiting, so under a simulator the order of
/// operations, revisions and events is exactly the order of the calls.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    clock: Arc<dyn TimeProvider>,
    events: broadcast::Sender<Notice>,
}

#[derive(Debug, Default)]
struct State {
    items: BTreeMap<String, Stored>,
    revision: u64,
}

#[derive(Debug, Clone)]
struct Stored {
    value: Vec<u8>,
    revision: u64,
    expires_secs: Option<u64>,
}

impl Stored {
    fn is_live(&self, now_secs: u64) -> bool {
        self.expires_secs.is_none_or(|expires| expires > now_secs)
    }

    fn to_item(&self, key: &str) -> Item {
        Item {
            key: key.to_owned(),
            value: self.value.clone(),
            revision: Revision(self.revision),
            expires: self.expires_secs.map(unix_time),
        }
    }
}

impl MemoryBackend {
    pub fn new(clock: Arc<dyn TimeProvider>) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                clock,
                events: broadcast::channel(WATCH_EVENTS_MAX).0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the map consistent (every mutation is a
        // single insert or remove), so a poisoned lock is still safe to use.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn live<'s>(state: &'s State, key: &str, now_secs: u64) -> Option<&'s Stored> {
        state
            .items
            .get(key)
            .filter(|stored| stored.is_live(now_secs))
    }

    fn write(
        &self,
        state: &mut State,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        now_secs: u64,
    ) -> Revision {
        state.revision += 1;
        let stored = Stored {
            value: value.to_vec(),
            revision: state.revision,
            expires_secs: ttl.map(|ttl| expiry_secs(now_secs, ttl)),
        };
        let item = stored.to_item(key);
        state.items.insert(key.to_owned(), stored);
        // No receivers is not an error: nobody is watching.
        let _ = self.shared.events.send(Notice::Change(Event::Put(item)));
        Revision(state.revision)
    }

    fn remove(&self, state: &mut State, key: &str) {
        state.items.remove(key);
        state.revision += 1;
        let _ = self.shared.events.send(Notice::Change(Event::Delete {
            key: key.to_owned(),
            revision: Revision(state.revision),
        }));
    }
}

impl Backend for MemoryBackend {
    async fn get(&self, key: &str) -> Result<Option<Item>, Error> {
        check_key(key)?;
        let now = now_secs(&self.shared.clock);
        let state = self.lock();
        Ok(Self::live(&state, key, now).map(|stored| stored.to_item(key)))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Item>, Error> {
        check_prefix(prefix)?;
        let now = now_secs(&self.shared.clock);
        let state = self.lock();
        let mut items = Vec::new();
        for (key, stored) in state.items.range(prefix.to_owned()..) {
            if !key.starts_with(prefix) {
                break;
            }
            if !stored.is_live(now) {
                continue;
            }
            if items.len() == LIST_ITEMS_MAX {
                return Err(Error::invalid(
                    "prefix",
                    format!("{prefix:?} holds more than {LIST_ITEMS_MAX} items"),
                ));
            }
            items.push(stored.to_item(key));
        }
        Ok(items)
    }

    async fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<Revision, Error> {
        check_key(key)?;
        check_value(value)?;
        let now = now_secs(&self.shared.clock);
        let mut state = self.lock();
        Ok(self.write(&mut state, key, value, ttl, now))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Expect,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<Revision, Error> {
        check_key(key)?;
        check_value(value)?;
        let now = now_secs(&self.shared.clock);
        let mut state = self.lock();
        let current = Self::live(&state, key, now).map(|stored| Revision(stored.revision));
        let matches = match expected {
            Expect::Absent => current.is_none(),
            Expect::Revision(revision) => current == Some(revision),
        };
        if !matches {
            return Err(Error::Conflict {
                key: key.to_owned(),
            });
        }
        Ok(self.write(&mut state, key, value, ttl, now))
    }

    async fn delete(&self, key: &str) -> Result<bool, Error> {
        check_key(key)?;
        let now = now_secs(&self.shared.clock);
        let mut state = self.lock();
        if Self::live(&state, key, now).is_none() {
            return Ok(false);
        }
        self.remove(&mut state, key);
        Ok(true)
    }

    async fn compare_and_delete(&self, key: &str, revision: Revision) -> Result<(), Error> {
        check_key(key)?;
        let now = now_secs(&self.shared.clock);
        let mut state = self.lock();
        let current = Self::live(&state, key, now).map(|stored| Revision(stored.revision));
        if current != Some(revision) {
            return Err(Error::Conflict {
                key: key.to_owned(),
            });
        }
        self.remove(&mut state, key);
        Ok(())
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, Error> {
        check_prefix(prefix)?;
        let now = now_secs(&self.shared.clock);
        let mut state = self.lock();
        let keys: Vec<String> = state
            .items
            .range(prefix.to_owned()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .filter(|(_, stored)| stored.is_live(now))
            .map(|(key, _)| key.clone())
            .collect();
        for key in &keys {
            self.remove(&mut state, key);
        }
        Ok(keys.len() as u64)
    }

    async fn keep_alive(&self, key: &str, revision: Revision, ttl: Duration) -> Result<(), Error> {
        check_key(key)?;
        let now = now_secs(&self.shared.clock);
        let mut state = self.lock();
        match state.items.get_mut(key) {
            Some(stored) if stored.is_live(now) && stored.revision == revision.0 => {
                stored.expires_secs = Some(expiry_secs(now, ttl));
                Ok(())
            }
            _ => Err(Error::Conflict {
                key: key.to_owned(),
            }),
        }
    }

    async fn expire(&self) -> Result<u64, Error> {
        let now = now_secs(&self.shared.clock);
        let mut state = self.lock();
        let keys: Vec<String> = state
            .items
            .iter()
            .filter(|(_, stored)| !stored.is_live(now))
            .map(|(key, _)| key.clone())
            .collect();
        for key in &keys {
            self.remove(&mut state, key);
        }
        Ok(keys.len() as u64)
    }

    async fn watch(&self, prefix: &str) -> Result<Watcher, Error> {
        check_prefix(prefix)?;
        Ok(Watcher::new(prefix, self.shared.events.subscribe()))
    }
}
