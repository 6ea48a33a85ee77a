//! End-to-end tests: the real `fd` binary against a real registry on 127.0.0.1 and real images.
mod harness;
mod hostile;
mod mirror;
mod mount;
mod p2p;
mod pull;
mod run;
mod serve;
