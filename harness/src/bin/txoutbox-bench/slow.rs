//! Slow answers of an open loop, grouped into episodes: where a p99 spike came from.
//!
//! An open loop counts each order's latency from its due instant, so a spike says that answers
//! were late, not where they waited. Each slow answer is split at the instant its request was
//! sent: before it, the order waited for a free sender (every sender busy with earlier
//! requests, or the load generator itself not running); after it, the server (and the network)
//! took the time. Answers due close together form an episode. `S` senders keep up with `R`
//! orders/s only while an answer takes less than `S / R` (the sender budget): an episode with
//! an answer slower than that is the server's (its slow answers took the senders, and the
//! orders due meanwhile waited for one); one whose answers all came within the budget but were
//! sent late is a stall of the load generator itself.

use std::time::Duration;

use serde_json::{json, Value};

/// An answer is slow from this latency on (from its due instant).
pub const SLOW_ANSWER: Duration = Duration::from_millis(200);

/// Slow answers kept per sender thread; past it, further ones are counted but not kept.
pub const KEPT_PER_SENDER: usize = 512;

/// Slow answers due within this of each other belong to one episode.
pub const EPISODE_GAP: Duration = Duration::from_secs(1);

/// One slow answer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowAnswer {
    /// Its order's due instant, from the first measured order's.
    pub due: Duration,
    /// From the due instant until the request was sent (waiting for a sender).
    pub waited: Duration,
    /// From sending the request until its answer.
    pub answered_in: Duration,
    /// Its sender had to open a new connection for it.
    pub new_connection: bool,
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
    /// Slow answers in it.
    pub answers: usize,
    /// Its worst latency.
    pub worst: Duration,
    /// Its longest time between sending and answer: how long the server held a request.
    pub longest_answer: Duration,
    /// Its longest wait for a sender.
    pub longest_wait: Duration,
    /// Of its answers, those sent on a new connection.
    pub new_connections: usize,
}

impl Episode {
    /// Where the time went, in words, given the sender budget (see the module's doc).
    pub fn reading(&self, budget: Duration) -> &'static str {
        if self.longest_answer >= budget {
            "server: answers slower than the senders' budget, later orders waited for a sender"
        } else {
            "load generator: answers within the budget, yet sent late"
        }
    }

    /// For `results.json` / `soak.json`.
    pub fn to_json(self, budget: Duration) -> Value {
        json!({
            "start_s": self.start.as_secs_f64(),
            "end_s": self.end.as_secs_f64(),
            "answers": self.answers,
            "worst_ms": ms(self.worst),
            "longest_answer_ms": ms(self.longest_answer),
            "longest_wait_ms": ms(self.longest_wait),
            "new_connections": self.new_connections,
            "reading": self.reading(budget),
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Groups `answers` (in any order) into episodes, in time order: an answer due within
/// [`EPISODE_GAP`] of the previous one joins its episode.
pub fn episodes(answers: &[SlowAnswer]) -> Vec<Episode> {
    let mut sorted = answers.to_vec();
    sorted.sort_by_key(|a| a.due);
    let mut episodes: Vec<Episode> = Vec::new();
    for answer in sorted {
        match episodes.last_mut() {
            Some(episode) if answer.due <= episode.end + EPISODE_GAP => {
                episode.end = answer.due;
                episode.answers += 1;
                episode.worst = episode.worst.max(answer.latency());
                episode.longest_answer = episode.longest_answer.max(answer.answered_in);
                episode.longest_wait = episode.longest_wait.max(answer.waited);
                episode.new_connections += usize::from(answer.new_connection);
            }
            _ => episodes.push(Episode {
                start: answer.due,
                end: answer.due,
                answers: 1,
                worst: answer.latency(),
                longest_answer: answer.answered_in,
                longest_wait: answer.waited,
                new_connections: usize::from(answer.new_connection),
            }),
        }
    }
    episodes
}

/// How long an answer may take before `senders` fall behind a schedule of `rate` orders/s.
pub fn sender_budget(senders: usize, rate: f64) -> Duration {
    if rate > 0.0 && rate.is_finite() {
        Duration::from_secs_f64(senders as f64 / rate)
    } else {
        Duration::MAX
    }
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

    fn answer(due_ms: u64, waited_ms: u64, answered_ms: u64) -> SlowAnswer {
        SlowAnswer {
            due: Duration::from_millis(due_ms),
            waited: Duration::from_millis(waited_ms),
            answered_in: Duration::from_millis(answered_ms),
            new_connection: false,
        }
    }

    #[test]
    fn answers_due_within_the_gap_form_one_episode_and_a_longer_gap_starts_another() {
        let answers = [
            answer(10_500, 0, 300),
            answer(10_000, 0, 900),
            answer(11_400, 400, 20),
            answer(13_000, 0, 250),
        ];
        let found = episodes(&answers);
        assert_eq!(found.len(), 2, "{found:?}");
        let first = found[0];
        assert_eq!(first.start, Duration::from_millis(10_000));
        assert_eq!(first.end, Duration::from_millis(11_400));
        assert_eq!(first.answers, 3);
        assert_eq!(first.worst, Duration::from_millis(900));
        assert_eq!(first.longest_answer, Duration::from_millis(900));
        assert_eq!(first.longest_wait, Duration::from_millis(400));
        assert_eq!(found[1].start, Duration::from_millis(13_000));
        assert_eq!(found[1].answers, 1);
    }

    #[test]
    fn an_episode_is_the_servers_when_an_answer_took_longer_than_the_sender_budget() {
        // 64 senders at 1,476 orders/s: an answer may take 43 ms before they fall behind.
        let budget = sender_budget(64, 1_476.0);
        assert_eq!(budget.as_millis(), 43);
        // Answers of 274 ms (the soak of 2026-12-08, 870 s in): the senders were all busy, and
        // the orders due meanwhile waited for one, longer than any answer took.
        let slowed = episodes(&[answer(0, 0, 274), answer(100, 513, 121)]);
        assert!(slowed[0].reading(budget).starts_with("server"), "{:?}", slowed[0]);
        // Every answer within the budget, every request sent late: the load generator stalled.
        let client = episodes(&[answer(0, 1_400, 5), answer(50, 1_350, 8)]);
        assert!(
            client[0].reading(budget).starts_with("load generator"),
            "{:?}",
            client[0]
        );
        assert_eq!(sender_budget(64, 0.0), Duration::MAX);
    }

    #[test]
    fn the_worst_episodes_come_first() {
        let found = episodes(&[answer(0, 0, 300), answer(5_000, 0, 2_000), answer(10_000, 0, 700)]);
        let top = worst(&found, 2);
        assert_eq!(top, vec![1, 2]);
        assert_eq!(found[top[0]].worst, Duration::from_millis(2_000));
    }
}
