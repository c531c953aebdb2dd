//! Slow answers of an open loop, grouped into episodes: where a p99 spike came from.
//!
//! An open loop counts each order's latency from its due instant, so a spike says that answers
//! were late, not where they waited. Each slow answer is split at the instant its request was
//! sent: before it, the order waited for a free sender; after it, the server (and the network)
//! took the time. An order goes out late only when no sender was free at its due instant: either
//! every sender was holding a request the server had not answered yet (the server's slowness
//! took them), or senders were free but did not run (the load generator itself stalled). So
//! each late request also records how many other senders were in flight when it went out.
//! Answers due close together form an episode; each sender groups its own as they come (its
//! orders are in due order), so memory grows with the number of episodes, not of answers, and
//! [`merge`] joins the senders' episodes at the end.
//!
//! The time to answer is measured by the sender thread, so a load generator starved of CPU
//! lengthens it too: the CPU each process used meanwhile (the soak's CPU timeline) says which.

use std::time::Duration;

use serde_json::{json, Value};

/// An answer is slow from this latency on (from its due instant).
pub const SLOW_ANSWER: Duration = Duration::from_millis(200);

/// A request sent this long after its due instant went out late.
pub const SENT_LATE: Duration = Duration::from_millis(1);

/// Slow answers due within this of each other belong to one episode.
pub const EPISODE_GAP: Duration = Duration::from_secs(1);

/// Episodes one sender keeps; past it, further slow answers are counted but not grouped (a
/// soak of 30 minutes has at most 1,800 gaps of a second).
pub const EPISODES_PER_SENDER: usize = 4_096;

/// One slow answer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowAnswer {
    /// Its order's due instant, from the first measured order's.
    pub due: Duration,
    /// From the due instant until the request was sent (waiting for a sender).
    pub waited: Duration,
    /// From sending the request until its answer.
    pub answered_in: Duration,
    /// It went out on a newly opened connection.
    pub new_connection: bool,
    /// When it was sent, every other sender but one (at most) was in flight.
    pub senders_busy: bool,
}

impl SlowAnswer {
    /// From the due instant to the answer.
    pub fn latency(&self) -> Duration {
        self.waited + self.answered_in
    }
}

/// Slow answers due close together.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Episode {
    /// Due instant of its first slow answer, from the first measured order's.
    pub start: Duration,
    /// Due instant of its last.
    pub end: Duration,
    /// When its last answer came, from the first measured order's due instant.
    pub answered_until: Duration,
    /// Slow answers in it.
    pub answers: usize,
    /// Its worst latency.
    pub worst: Duration,
    /// Its longest time between sending and answer.
    pub longest_answer: Duration,
    /// Its longest wait for a sender.
    pub longest_wait: Duration,
    /// Of its answers, those sent on a new connection.
    pub new_connections: usize,
    /// Of its answers, those sent more than [`SENT_LATE`] after their due instant.
    pub sent_late: usize,
    /// Of those, the ones sent while the other senders were in flight.
    pub sent_late_senders_busy: usize,
}

impl Episode {
    fn of(answer: &SlowAnswer) -> Episode {
        let late = answer.waited > SENT_LATE;
        Episode {
            start: answer.due,
            end: answer.due,
            answered_until: answer.due + answer.latency(),
            answers: 1,
            worst: answer.latency(),
            longest_answer: answer.answered_in,
            longest_wait: answer.waited,
            new_connections: usize::from(answer.new_connection),
            sent_late: usize::from(late),
            sent_late_senders_busy: usize::from(late && answer.senders_busy),
        }
    }

    /// Takes in `other`'s answers (an episode that overlaps or follows within the gap).
    fn absorb(&mut self, other: &Episode) {
        self.start = self.start.min(other.start);
        self.end = self.end.max(other.end);
        self.answered_until = self.answered_until.max(other.answered_until);
        self.answers += other.answers;
        self.worst = self.worst.max(other.worst);
        self.longest_answer = self.longest_answer.max(other.longest_answer);
        self.longest_wait = self.longest_wait.max(other.longest_wait);
        self.new_connections += other.new_connections;
        self.sent_late += other.sent_late;
        self.sent_late_senders_busy += other.sent_late_senders_busy;
    }

    /// Where the time went, in words (see the module's doc).
    pub fn reading(&self) -> &'static str {
        if self.sent_late == 0 {
            "server: answers slow, none sent late"
        } else if self.sent_late_senders_busy * 2 >= self.sent_late {
            "server: orders waited for senders all held by unanswered requests"
        } else {
            "load generator: orders sent late while senders were free"
        }
    }

    /// For `soak.json`.
    pub fn to_json(self) -> Value {
        json!({
            "start_s": self.start.as_secs_f64(),
            "end_s": self.end.as_secs_f64(),
            "answered_until_s": self.answered_until.as_secs_f64(),
            "answers": self.answers,
            "worst_ms": ms(self.worst),
            "longest_answer_ms": ms(self.longest_answer),
            "longest_wait_ms": ms(self.longest_wait),
            "new_connections": self.new_connections,
            "sent_late": self.sent_late,
            "sent_late_senders_busy": self.sent_late_senders_busy,
            "reading": self.reading(),
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One sender's episodes, grouped as its slow answers come (in due order).
#[derive(Debug, Default)]
pub struct SenderEpisodes {
    /// In time order.
    pub episodes: Vec<Episode>,
    /// Slow answers that found [`EPISODES_PER_SENDER`] episodes kept already.
    pub not_kept: usize,
}

impl SenderEpisodes {
    /// Adds one slow answer: to the last episode when due within [`EPISODE_GAP`] of its end.
    pub fn add(&mut self, answer: &SlowAnswer) {
        let episode = Episode::of(answer);
        let full = self.episodes.len() >= EPISODES_PER_SENDER;
        match self.episodes.last_mut() {
            Some(last) if answer.due <= last.end + EPISODE_GAP => last.absorb(&episode),
            _ if full => self.not_kept += 1,
            _ => self.episodes.push(episode),
        }
    }
}

/// Joins the episodes of all senders (in any order) into one list in time order: episodes that
/// overlap or follow within [`EPISODE_GAP`] are one.
pub fn merge(mut episodes: Vec<Episode>) -> Vec<Episode> {
    episodes.sort_by_key(|e| e.start);
    let mut merged: Vec<Episode> = Vec::new();
    for episode in episodes {
        match merged.last_mut() {
            Some(last) if episode.start <= last.end + EPISODE_GAP => last.absorb(&episode),
            _ => merged.push(episode),
        }
    }
    merged
}

/// Indices of the `n` episodes with the worst latencies, worst first.
pub fn worst(episodes: &[Episode], n: usize) -> Vec<usize> {
    let mut indices: Vec<usize> = (0..episodes.len()).collect();
    indices.sort_by(|&a, &b| episodes[b].worst.cmp(&episodes[a].worst));
    indices.truncate(n);
    indices
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(due_ms: u64, waited_ms: u64, answered_ms: u64, senders_busy: bool) -> SlowAnswer {
        SlowAnswer {
            due: Duration::from_millis(due_ms),
            waited: Duration::from_millis(waited_ms),
            answered_in: Duration::from_millis(answered_ms),
            new_connection: false,
            senders_busy,
        }
    }

    /// Each sender's answers in due order, as the open loop adds them.
    fn grouped(senders: &[&[SlowAnswer]]) -> Vec<Episode> {
        let mut all = Vec::new();
        for answers in senders {
            let mut mine = SenderEpisodes::default();
            for a in *answers {
                mine.add(a);
            }
            all.extend(mine.episodes);
        }
        merge(all)
    }

    #[test]
    fn answers_due_within_the_gap_form_one_episode_across_senders_and_a_longer_gap_starts_another() {
        let found = grouped(&[
            &[answer(10_000, 0, 900, false), answer(11_400, 400, 20, true)],
            &[answer(10_500, 0, 300, false), answer(13_000, 0, 250, false)],
        ]);
        assert_eq!(found.len(), 2, "{found:?}");
        let first = found[0];
        assert_eq!(first.start, Duration::from_millis(10_000));
        assert_eq!(first.end, Duration::from_millis(11_400));
        assert_eq!(first.answered_until, Duration::from_millis(11_820));
        assert_eq!(first.answers, 3);
        assert_eq!(first.worst, Duration::from_millis(900));
        assert_eq!(first.longest_answer, Duration::from_millis(900));
        assert_eq!(first.longest_wait, Duration::from_millis(400));
        assert_eq!((first.sent_late, first.sent_late_senders_busy), (1, 1));
        assert_eq!(found[1].start, Duration::from_millis(13_000));
        assert_eq!(found[1].answers, 1);
    }

    #[test]
    fn an_episode_is_the_servers_when_its_late_orders_found_every_sender_in_flight() {
        // Requests held for 274 ms: the orders due meanwhile went out late, each as soon as
        // a sender came back, the others all still in flight.
        let slowed = grouped(&[&[answer(0, 0, 274, true), answer(100, 513, 121, true)]]);
        assert!(slowed[0].reading().starts_with("server"), "{:?}", slowed[0]);
        // Slow answers, none sent late.
        let held = grouped(&[&[answer(0, 0, 600, false)]]);
        assert!(held[0].reading().starts_with("server"), "{:?}", held[0]);
        // Sent late while senders were free: the load generator did not run.
        let client = grouped(&[&[answer(0, 1_400, 5, false), answer(50, 1_350, 8, false)]]);
        assert!(
            client[0].reading().starts_with("load generator"),
            "{:?}",
            client[0]
        );
    }

    #[test]
    fn a_sender_keeps_a_bounded_number_of_episodes_and_counts_the_rest() {
        let mut mine = SenderEpisodes::default();
        let gap = EPISODE_GAP.as_millis() as u64 + 1;
        for i in 0..(EPISODES_PER_SENDER as u64 + 10) {
            mine.add(&answer(i * gap, 0, 300, false));
        }
        assert_eq!(mine.episodes.len(), EPISODES_PER_SENDER);
        assert_eq!(mine.not_kept, 10);
        // A stall of a minute is one episode however many answers it holds.
        let mut stall = SenderEpisodes::default();
        for i in 0..60_000 {
            stall.add(&answer(i, 0, 300, false));
        }
        assert_eq!((stall.episodes.len(), stall.episodes[0].answers), (1, 60_000));
    }

    #[test]
    fn the_worst_episodes_come_first() {
        let found = grouped(&[&[
            answer(0, 0, 300, false),
            answer(5_000, 0, 2_000, false),
            answer(10_000, 0, 700, false),
        ]]);
        let top = worst(&found, 2);
        assert_eq!(top, vec![1, 2]);
        assert_eq!(found[top[0]].worst, Duration::from_millis(2_000));
    }
}
