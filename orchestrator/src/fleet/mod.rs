//! The fleet's update bookkeeping: the per-device state machine of a campaign.

pub mod state;
