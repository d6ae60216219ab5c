//! `kiln simulate`: the research harness (`kiln-sim`) on real traces. `placement`: the FGD paper's experiment;
//! `serving`: keep-alive policies compared by replaying request traces through the controller's control loop, with
//! `report` rendering its HTML page. This module reads the files, prints and writes the results; the simulations
//! themselves are pure functions of `kiln-sim`.

pub mod calendar;
pub mod placement;
pub mod report;
pub mod serving;

pub use placement::{PlacementArgs, placement};
pub use serving::{ServingArgs, serving};
