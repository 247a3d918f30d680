// The migrations are embedded by `sqlx::migrate!`, which cargo does not know to watch: a
// new or changed file under migrations/ must rebuild the crate.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
