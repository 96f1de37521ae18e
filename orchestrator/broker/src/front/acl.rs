//! Topic ACLs: what each peer may publish to and subscribe to. Pure functions, no I/O.
//!
//! The rules follow the topic layout in `aloft_proto::topics`:
//! - device X publishes only to exactly `aloft/v1/d/X/status`, `.../chunk/req`, `.../health` and
//!   `.../csr` (certificate renewal);
//! - device X subscribes only to the fixed filters of [`device_filters`]: its `job`, `ack`,
//!   `chunk/resp` and `cert` topics, its whole subtree `aloft/v1/d/X/#`, and the public
//!   manifests as a whole (`aloft/v1/manifests/#` or `/+`);
//! - operator O publishes only to `aloft/v1/admin/O/<op>` (one level, no wildcards);
//! - operator O subscribes only under `aloft/v1/o/O/`;
//! - nobody publishes retained messages or uses topic aliases.
//!
//! A device's filters are a fixed list, not a prefix, because the embedded broker keeps every
//! distinct filter it has seen for as long as it runs (about 6 KiB each): a prefix rule let one
//! certificate grow the server by 600 MiB with 100,000 made-up filters inside its own subtree.
//! With the list, a device costs the broker at most that many filters, and a reconnect reuses
//! them. An operator's filters are checked against its literal prefix, so wildcards can only
//! appear after it; operators are few and trusted with the admin API anyway. Malformed filters
//! are refused even where MQTT would merely let them match nothing, and empty levels are
//! refused outright: Aloft never uses them.

use aloft_proto::topics;

use super::identity::Peer;

/// Why a PUBLISH, Will or SUBSCRIBE was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("retained messages are not allowed")]
    Retain,
    #[error("topic aliases are not allowed")]
    TopicAlias,
    #[error("topic is not valid UTF-8")]
    NotUtf8,
    #[error("not allowed to publish to this topic")]
    PublishTopic,
    #[error("malformed topic filter")]
    MalformedFilter,
    #[error("not allowed to subscribe to this filter")]
    SubscribeFilter,
}

/// May `peer` publish to `topic` (with these flags)? Also used for a CONNECT's Will.
pub fn check_publish(
    peer: &Peer,
    topic: &[u8],
    retain: bool,
    topic_alias: bool,
) -> Result<(), Denied> {
    if topic_alias {
        return Err(Denied::TopicAlias);
    }
    if retain {
        return Err(Denied::Retain);
    }
    let topic = std::str::from_utf8(topic).map_err(|_| Denied::NotUtf8)?;
    let allowed = match peer {
        Peer::Device(d) => {
            topic == topics::status(d)
                || topic == topics::chunk_request(d)
                || topic == topics::health(d)
                || topic == topics::csr(d)
        }
        Peer::Operator(o) => topic
            .strip_prefix(&topics::admin_prefix(o))
            .is_some_and(is_plain_level),
    };
    if allowed {
        Ok(())
    } else {
        Err(Denied::PublishTopic)
    }
}

/// May `peer` subscribe to `filter`?
pub fn check_subscribe(peer: &Peer, filter: &str) -> Result<(), Denied> {
    if !is_valid_filter(filter) {
        return Err(Denied::MalformedFilter);
    }
    let allowed = match peer {
        Peer::Device(d) => device_filters(d).iter().any(|f| f == filter),
        Peer::Operator(o) => filter.starts_with(&topics::operator_prefix(o)),
    };
    if allowed {
        Ok(())
    } else {
        Err(Denied::SubscribeFilter)
    }
}

/// Every filter device `d` may subscribe to (PROTOCOL.md §4.2): the topics the orchestrator
/// sends it on, its whole subtree, and the public manifests as a whole.
pub fn device_filters(d: &aloft_proto::DeviceId) -> [String; 7] {
    let manifests = topics::manifests_prefix();
    [
        topics::job(d),
        topics::ack(d),
        topics::chunk_response(d),
        topics::cert(d),
        topics::device_subscription(d),
        format!("{manifests}#"),
        format!("{manifests}+"),
    ]
}

/// The four topics a device publishes to the orchestrator (PROTOCOL.md §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceTopic {
    Status,
    ChunkRequest,
    Health,
    Csr,
}

/// Which of its own topics device `d` publishes to, or `None` if `topic` is not one of them.
/// The same rule as [`check_publish`] for a device, without allocating: it runs for every
/// packet a device sends.
pub fn device_publish_topic(d: &aloft_proto::DeviceId, topic: &[u8]) -> Option<DeviceTopic> {
    let rest = topic
        .strip_prefix(topics::ROOT.as_bytes())?
        .strip_prefix(b"/d/")?
        .strip_prefix(d.as_str().as_bytes())?
        .strip_prefix(b"/")?;
    match rest {
        b"status" => Some(DeviceTopic::Status),
        b"chunk/req" => Some(DeviceTopic::ChunkRequest),
        b"health" => Some(DeviceTopic::Health),
        b"csr" => Some(DeviceTopic::Csr),
        _ => None,
    }
}

/// The position of `filter` in [`device_filters`] of `d`, if it is one of them.
pub fn device_filter_index(d: &aloft_proto::DeviceId, filter: &str) -> Option<usize> {
    device_filters(d).iter().position(|f| f == filter)
}

/// One non-empty topic level without separators, wildcards or NUL.
fn is_plain_level(level: &str) -> bool {
    !level.is_empty() && !level.contains(['/', '+', '#', '\0'])
}

/// A topic filter per MQTT 5 §4.7, made stricter: no empty levels, no NUL, no `$` topics.
pub fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.starts_with('$') || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "" => false,
        "+" => true,
        "#" => i == last,
        other => !other.contains(['+', '#']),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_proto::{DeviceId, OperatorId};

    fn dev(id: &str) -> Peer {
        Peer::Device(DeviceId::new(id).unwrap())
    }
    fn op(id: &str) -> Peer {
        Peer::Operator(OperatorId::new(id).unwrap())
    }
    fn publish(peer: &Peer, topic: &str) -> Result<(), Denied> {
        check_publish(peer, topic.as_bytes(), false, false)
    }

    #[test]
    fn device_publishes_only_its_status_and_chunk_requests() {
        let a = dev("dev-a");
        assert_eq!(publish(&a, "aloft/v1/d/dev-a/status"), Ok(()));
        assert_eq!(publish(&a, "aloft/v1/d/dev-a/chunk/req"), Ok(()));
        for t in [
            "aloft/v1/d/dev-b/status",
            "aloft/v1/d/dev-a/job",
            "aloft/v1/d/dev-a/chunk/resp",
            "aloft/v1/d/dev-a/ack",
            "aloft/v1/d/dev-a/status/",
            "aloft/v1/d/dev-a/status/x",
            "aloft/v1/d/dev-a/+",
            "aloft/v1/d/dev-a/#",
            "aloft/v1/d/+/status",
            "aloft/v1/d/dev-a",
            "aloft/v1/manifests/fw-1",
            "aloft/v1/admin/dev-a/x",
            "/aloft/v1/d/dev-a/status",
            "aloft/v1/d/dev-a//status",
            "aloft/v1/d/dev-a/status\0",
            "$SYS/x",
            "",
        ] {
            assert_eq!(publish(&a, t), Err(Denied::PublishTopic), "{t:?}");
        }
        // A device whose id is a prefix of another's gains nothing.
        assert_eq!(
            publish(&dev("dev"), "aloft/v1/d/dev-a/status"),
            Err(Denied::PublishTopic)
        );
    }

    #[test]
    fn device_publishes_renewal_requests_only_on_its_own_csr_topic() {
        let a = dev("dev-a");
        assert_eq!(publish(&a, "aloft/v1/d/dev-a/csr"), Ok(()));
        for t in [
            "aloft/v1/d/dev-b/csr",
            "aloft/v1/d/dev-a/cert",
            "aloft/v1/d/dev-a/csr/x",
            "aloft/v1/d/+/csr",
        ] {
            assert_eq!(publish(&a, t), Err(Denied::PublishTopic), "{t:?}");
        }
        // The certificate comes back inside the device's own subtree, and only there.
        assert_eq!(check_subscribe(&a, "aloft/v1/d/dev-a/cert"), Ok(()));
        assert_eq!(
            check_subscribe(&a, "aloft/v1/d/dev-b/cert"),
            Err(Denied::SubscribeFilter)
        );
        assert_eq!(
            publish(&op("alice"), "aloft/v1/d/alice/csr"),
            Err(Denied::PublishTopic)
        );
    }

    #[test]
    fn retain_topic_alias_and_invalid_utf8_are_refused_for_everyone() {
        for p in [dev("dev-a"), op("alice")] {
            let ok_topic = match &p {
                Peer::Device(_) => "aloft/v1/d/dev-a/status",
                Peer::Operator(_) => "aloft/v1/admin/alice/campaign.create",
            };
            assert_eq!(check_publish(&p, ok_topic.as_bytes(), false, false), Ok(()));
            assert_eq!(
                check_publish(&p, ok_topic.as_bytes(), true, false),
                Err(Denied::Retain)
            );
            assert_eq!(
                check_publish(&p, ok_topic.as_bytes(), false, true),
                Err(Denied::TopicAlias)
            );
            assert_eq!(check_publish(&p, b"", false, true), Err(Denied::TopicAlias));
            assert_eq!(
                check_publish(&p, b"aloft/v1/\xff", false, false),
                Err(Denied::NotUtf8)
            );
        }
    }

    #[test]
    fn operator_publishes_one_level_under_its_own_admin_prefix() {
        let o = op("alice");
        assert_eq!(publish(&o, "aloft/v1/admin/alice/campaign.create"), Ok(()));
        assert_eq!(publish(&o, "aloft/v1/admin/alice/x"), Ok(()));
        for t in [
            "aloft/v1/admin/alice/",
            "aloft/v1/admin/alice",
            "aloft/v1/admin/alice/a/b",
            "aloft/v1/admin/alice/+",
            "aloft/v1/admin/alice/#",
            "aloft/v1/admin/bob/x",
            "aloft/v1/admin/+/x",
            "aloft/v1/o/alice/reply",
            "aloft/v1/d/alice/status",
            "aloft/v1/manifests/fw",
        ] {
            assert_eq!(publish(&o, t), Err(Denied::PublishTopic), "{t:?}");
        }
    }

    #[test]
    fn device_subscribes_only_to_its_fixed_filters() {
        let a = dev("dev-a");
        for f in [
            "aloft/v1/d/dev-a/#",
            "aloft/v1/d/dev-a/job",
            "aloft/v1/d/dev-a/ack",
            "aloft/v1/d/dev-a/cert",
            "aloft/v1/d/dev-a/chunk/resp",
            "aloft/v1/manifests/#",
            "aloft/v1/manifests/+",
        ] {
            assert_eq!(check_subscribe(&a, f), Ok(()), "{f:?}");
        }
        for f in [
            // In the device's own subtree, but not a filter the protocol needs: each distinct
            // one would cost the broker memory for as long as it runs.
            "aloft/v1/d/dev-a/+",
            "aloft/v1/d/dev-a/+/resp",
            "aloft/v1/d/dev-a/job/#",
            "aloft/v1/d/dev-a/x0001",
            "aloft/v1/d/dev-a/status",
            "aloft/v1/manifests/fw-1",
            "#",
            "+",
            "aloft/#",
            "aloft/v1/#",
            "aloft/v1/d/#",
            "aloft/v1/d/+/job",
            "aloft/v1/d/+/#",
            "aloft/v1/d/dev-b/#",
            "aloft/v1/d/dev-a",
            "aloft/v1/d/dev-ab/#",
            "aloft/v1/d/dev/#",
            "aloft/v1/o/dev-a/#",
            "aloft/v1/admin/#",
            "aloft/v1/manifests",
            "+/v1/d/dev-a/#",
        ] {
            assert_eq!(
                check_subscribe(&a, f),
                Err(Denied::SubscribeFilter),
                "{f:?}"
            );
        }
        for f in [
            "$share/g/aloft/v1/d/dev-a/#",
            "$SYS/#",
            "aloft/v1/d/dev-a/",
            "aloft/v1/d/dev-a//job",
            "aloft/v1/d/dev-a/#/job",
            "aloft/v1/d/dev-a/j#",
            "aloft/v1/d/dev-a/j+",
            "aloft/v1/d/dev-a/+x",
            "aloft/v1/d/dev-a/job\0",
            "aloft/v1/manifests/",
            "",
        ] {
            assert_eq!(
                check_subscribe(&a, f),
                Err(Denied::MalformedFilter),
                "{f:?}"
            );
        }
    }

    #[test]
    fn operator_subscribes_only_under_its_reply_prefix() {
        let o = op("alice");
        assert_eq!(check_subscribe(&o, "aloft/v1/o/alice/reply"), Ok(()));
        assert_eq!(check_subscribe(&o, "aloft/v1/o/alice/#"), Ok(()));
        for f in [
            "aloft/v1/o/bob/#",
            "aloft/v1/o/+/reply",
            "aloft/v1/o/alice",
            "aloft/v1/admin/alice/#",
            "aloft/v1/d/alice/#",
            "aloft/v1/manifests/#",
            "#",
        ] {
            assert_eq!(
                check_subscribe(&o, f),
                Err(Denied::SubscribeFilter),
                "{f:?}"
            );
        }
    }

    #[test]
    fn filter_syntax_follows_mqtt_with_no_empty_levels() {
        for f in ["a", "a/b", "+", "#", "a/+/b", "a/#", "+/+"] {
            assert!(is_valid_filter(f), "{f:?}");
        }
        for f in [
            "", "a/", "/a", "a//b", "#/a", "a/#/b", "a#", "a+", "+a", "$x", "a\0",
        ] {
            assert!(!is_valid_filter(f), "{f:?}");
        }
    }
}
