//! `uniffi-bindgen generate --library target/release/libdevicelink_ffi.so --language kotlin ...`
fn main() {
    uniffi::uniffi_bindgen_main()
}
