//! End-to-end tests: the real orchestrator (in-process, or a child process where it must be
//! killed), its embedded broker behind the mTLS front, and simulated devices running the real
//! agent, all over loopback with certificates from the project's own CA.

mod common;

mod attacks;
mod backup;
mod bench;
mod campaign;
mod certs;
mod console;
mod delta;
mod external;
mod faults;
mod fuzz_corpus;
mod observability;
mod operator_cli;
mod origin;
mod postgres;
mod preconditions;
mod readme;
mod replicas;
mod restart;
mod roles;
mod rollout;
mod starvation;
mod trust;
