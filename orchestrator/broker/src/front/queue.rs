//! A bounded queue with one reader that holds no memory while it is empty: a device session's
//! chunk, control and reply queues.
//!
//! Why not `tokio::sync::mpsc`: a tokio channel allocates its shared state (cache-line padded)
//! and a first block of 32 slots when it opens, whether anything is ever sent. A connected
//! device had three of them, 4.4 KB of its 22 KB in the orchestrator, though an idle device
//! is sent nothing but PINGRESPs. Here an empty queue is a `VecDeque` with no buffer: it grows
//! as items come, up to its cap, and gives its buffer back whenever the reader empties it.
//!
//! The reader is woken through a [`Notify`], whose stored permit means a push between the
//! reader's look at the queue and its wait is not lost; [`Receiver::recv`] is cancel-safe, so it
//! may be one branch of a `select!`. Dropping the [`Receiver`] closes the queue and drops what it
//! holds (a queued chunk frame gives its bytes back to the fleet budget then), as tokio's does.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Why an item was not queued; the item comes back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TrySendError<T> {
    /// The queue holds its cap.
    Full(T),
    /// The reader is gone.
    Closed(T),
}

/// The reader is gone; the item comes back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Closed<T>(pub T);

#[derive(Debug)]
struct Shared<T> {
    state: Mutex<State<T>>,
    cap: usize,
    /// Signalled when an item is queued (the reader waits on it).
    pushed: Notify,
    /// Signalled when an item is taken (a writer waiting for room waits on it).
    taken: Notify,
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

/// A queue's writing end; clones write to the same queue.
#[derive(Debug)]
pub(crate) struct Sender<T>(Arc<Shared<T>>);

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

/// A queue's one reading end.
#[derive(Debug)]
pub(crate) struct Receiver<T>(Arc<Shared<T>>);

/// A queue of at most `cap` items (at least one).
pub(crate) fn bounded<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            closed: false,
        }),
        cap: cap.max(1),
        pushed: Notify::new(),
        taken: Notify::new(),
    });
    (Sender(Arc::clone(&shared)), Receiver(shared))
}

impl<T> Shared<T> {
    /// Locks the queue. Nothing panics while holding it, and a poisoned one is still a
    /// consistent queue.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<T> Sender<T> {
    /// Queues `item` if there is room and the reader is still there.
    pub(crate) fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        {
            let mut state = self.0.lock();
            if state.closed {
                return Err(TrySendError::Closed(item));
            }
            if state.items.len() >= self.0.cap {
                return Err(TrySendError::Full(item));
            }
            state.items.push_back(item);
        }
        self.0.pushed.notify_one();
        Ok(())
    }

    /// Queues `item`, waiting for room; fails only if the reader is gone.
    pub(crate) async fn send(&self, mut item: T) -> Result<(), Closed<T>> {
        loop {
            // Registered before the look, so neither a take nor the reader's drop between the
            // look and the wait is missed.
            let taken = self.0.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            match self.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(back)) => return Err(Closed(back)),
                Err(TrySendError::Full(back)) => item = back,
            }
            taken.await;
        }
    }
}

impl<T> Receiver<T> {
    /// The next item, once there is one. Cancel-safe: an item is taken only when this returns.
    pub(crate) async fn recv(&mut self) -> T {
        loop {
            if let Some(item) = self.try_recv() {
                return item;
            }
            // A permit stored by a push since the look above ends this wait at once.
            self.0.pushed.notified().await;
        }
    }

    /// The next item if there is one now.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        let item = {
            let mut state = self.0.lock();
            let item = state.items.pop_front()?;
            if state.items.is_empty() {
                // An idle queue holds no buffer (a burst's buffer is freed with its last item).
                state.items = VecDeque::new();
            }
            item
        };
        self.0.taken.notify_one();
        Some(item)
    }

    /// Items queued now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.lock().items.len()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // Taken out under the lock, dropped after it: an item's drop may take other locks.
        let items = {
            let mut state = self.0.lock();
            state.closed = true;
            std::mem::take(&mut state.items)
        };
        drop(items);
        // Writers waiting for room learn that the queue closed.
        self.0.taken.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_refuses_beyond_its_cap_and_keeps_order() {
        let (tx, mut rx) = bounded(2);
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx.try_send(2), Ok(()));
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(tx.try_send(3), Ok(()));
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), Some(3));
        assert_eq!(rx.try_recv(), None);
    }

    #[test]
    fn an_emptied_queue_gives_its_buffer_back() {
        let (tx, mut rx) = bounded(64);
        for i in 0..40 {
            assert_eq!(tx.try_send(i), Ok(()));
        }
        assert!(rx.0.lock().items.capacity() >= 40);
        while rx.try_recv().is_some() {}
        assert_eq!(rx.0.lock().items.capacity(), 0);
        assert_eq!(rx.len(), 0);
    }

    #[test]
    fn a_dropped_reader_closes_the_queue_and_drops_what_it_held() {
        let held = Arc::new(());
        let (tx, rx) = bounded(4);
        assert_eq!(tx.try_send(Arc::clone(&held)), Ok(()));
        drop(rx);
        assert_eq!(Arc::strong_count(&held), 1);
        assert!(matches!(
            tx.try_send(Arc::clone(&held)),
            Err(TrySendError::Closed(_))
        ));
    }

    #[tokio::test]
    async fn a_reader_waiting_on_an_empty_queue_wakes_for_the_next_item() {
        let (tx, mut rx) = bounded(1);
        let reader = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        assert_eq!(tx.try_send(7), Ok(()));
        assert_eq!(reader.await.ok(), Some(7));
    }

    #[tokio::test]
    async fn a_recv_dropped_by_select_loses_no_item() {
        let (tx, mut rx) = bounded(4);
        // The recv loses the race to a ready branch, then a push comes: the next recv has it.
        tokio::select! {
            biased;
            () = std::future::ready(()) => {}
            _ = rx.recv() => unreachable!("the queue is empty"),
        }
        assert_eq!(tx.try_send(5), Ok(()));
        assert_eq!(rx.recv().await, 5);
    }

    #[tokio::test]
    async fn a_writer_waits_for_room_and_fails_when_the_reader_goes() {
        let (tx, mut rx) = bounded(1);
        assert_eq!(tx.send(1).await, Ok(()));
        let waiting = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(2).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(rx.recv().await, 1);
        assert_eq!(waiting.await.ok(), Some(Ok(())));
        assert_eq!(rx.recv().await, 2);

        assert_eq!(tx.send(3).await, Ok(()));
        let blocked = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(4).await })
        };
        tokio::task::yield_now().await;
        drop(rx);
        assert_eq!(blocked.await.ok(), Some(Err(Closed(4))));
    }
}
