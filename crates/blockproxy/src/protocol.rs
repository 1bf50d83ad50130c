//! The NBD wire protocol as pure functions over bytes: parsing what clients send and encoding
//! what the server answers. Nothing here does I/O, so every parser can be property-tested and
//! fuzzed on arbitrary input; `server` drives these functions over sockets.
//!
//! Reference: the NBD protocol description (`doc/proto.md` of the NetworkBlockDevice project).
//! Only what a read-only server needs is implemented: fixed newstyle negotiation, `NBD_OPT_GO` /
//! `NBD_OPT_INFO`, structured replies, the `base:allocation` metadata context.

use std::fmt;

// --- magic numbers -------------------------------------------------------------------------
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// --- handshake flags ------------------------------------------------------------------------
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// --- transmission flags ---------------------------------------------------------------------
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;

// --- options ---------------------------------------------------------------------------------
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// --- option replies --------------------------------------------------------------------------
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// --- info types ------------------------------------------------------------------------------
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// --- commands --------------------------------------------------------------------------------
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// --- structured replies ----------------------------------------------------------------------
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// --- errors ----------------------------------------------------------------------------------
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// --- base:allocation -------------------------------------------------------------------------
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// Context id this server gives `base:allocation` (ids are opaque to clients).
pub const BASE_ALLOCATION_ID: u32 = 1;

// --- limits ----------------------------------------------------------------------------------
/// Largest read (and block-status range is unlimited) we serve in one request: 32 MiB.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest option payload we read and parse; larger ones get `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Strings (export names, queries) longer than this are invalid (protocol limit).
pub const MAX_STRING: usize = 4096;
/// Most metadata-context queries we accept in one option.
pub const MAX_QUERIES: u32 = 128;
/// Most extents sent in one block-status reply.
pub const MAX_EXTENTS: usize = 1 << 16;

/// Transmission flags of every vgrid export: read-only, flush is a no-op, cache is shared by
/// all connections, `NBD_CMD_CACHE` prefetches.
pub const EXPORT_FLAGS: u16 = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE;

/// Malformed input that forces the server to close the connection (no reply is possible).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FatalError {
    #[error("client flags {0:#x} contain bits this server did not offer")]
    ClientFlags(u32),
    #[error("option header has magic {0:#018x}, expected IHAVEOPT")]
    OptionMagic(u64),
    #[error("request header has magic {0:#010x}, expected {REQUEST_MAGIC:#010x}")]
    RequestMagic(u32),
    #[error("export name in NBD_OPT_EXPORT_NAME is not valid: {0}")]
    ExportName(#[source] InvalidOption),
}

/// The server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// What the client said in its 32-bit flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Parses the client flags; unknown bits are fatal (the spec says drop the connection).
pub fn parse_client_flags(b: [u8; 4]) -> Result<ClientFlags, FatalError> {
    let f = u32::from_be_bytes(b);
    if f & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(FatalError::ClientFlags(f));
    }
    Ok(ClientFlags { fixed_newstyle: f & FLAG_C_FIXED_NEWSTYLE != 0, no_zeroes: f & FLAG_C_NO_ZEROES != 0 })
}

/// Header of one client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, FatalError> {
    let magic = u64::from_be_bytes(b[0..8].try_into().unwrap());
    if magic != IHAVEOPT {
        return Err(FatalError::OptionMagic(magic));
    }
    Ok(OptionHeader { option: u32::from_be_bytes(b[8..12].try_into().unwrap()), len: u32::from_be_bytes(b[12..16].try_into().unwrap()) })
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaQuery {
    pub export: String,
    pub queries: Vec<String>,
}

/// A parsed client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaQuery),
    SetMetaContext(MetaQuery),
    /// Known to the protocol or not, but unsupported here: answer `NBD_REP_ERR_UNSUP`.
    Unsupported(u32),
}

/// A syntactically invalid option: answer `NBD_REP_ERR_INVALID` with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidOption(pub String);

fn invalid(what: &str, why: impl fmt::Display) -> InvalidOption {
    InvalidOption(format!("{what}: {why}"))
}

/// A cursor over option data; every read is bounds-checked.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
}

fn nbd_string(bytes: &[u8], what: &str) -> Result<String, InvalidOption> {
    if bytes.len() > MAX_STRING {
        return Err(invalid(what, format!("{} bytes, longer than the 4096-byte limit", bytes.len())));
    }
    let s = std::str::from_utf8(bytes).map_err(|_| invalid(what, "not valid UTF-8"))?;
    if s.contains('\0') {
        return Err(invalid(what, "contains a NUL character"));
    }
    Ok(s.to_string())
}

fn parse_info(data: &[u8], opt: &str) -> Result<InfoRequest, InvalidOption> {
    let mut c = Cursor { data, pos: 0 };
    let n = c.u32().ok_or_else(|| invalid(opt, "data shorter than the name length field"))?;
    let name = c.take(n as usize).ok_or_else(|| invalid(opt, format!("name length {n} exceeds the option data")))?;
    let name = nbd_string(name, opt)?;
    let count = c.u16().ok_or_else(|| invalid(opt, "data lacks the information request count"))?;
    if c.remaining() != count as usize * 2 {
        return Err(invalid(opt, format!("{count} information requests announced but {} bytes follow", c.remaining())));
    }
    let requests = (0..count).map(|_| c.u16().unwrap()).collect();
    Ok(InfoRequest { name, requests })
}

fn parse_meta(data: &[u8], opt: &str) -> Result<MetaQuery, InvalidOption> {
    let mut c = Cursor { data, pos: 0 };
    let n = c.u32().ok_or_else(|| invalid(opt, "data shorter than the export name length"))?;
    let export = c.take(n as usize).ok_or_else(|| invalid(opt, format!("export name length {n} exceeds the option data")))?;
    let export = nbd_string(export, opt)?;
    let count = c.u32().ok_or_else(|| invalid(opt, "data lacks the query count"))?;
    if count > MAX_QUERIES {
        return Err(invalid(opt, format!("{count} queries, more than the {MAX_QUERIES} accepted")));
    }
    let mut queries = Vec::with_capacity(count as usize);
    for i in 0..count {
        let len = c.u32().ok_or_else(|| invalid(opt, format!("query {i} lacks its length")))?;
        let q = c.take(len as usize).ok_or_else(|| invalid(opt, format!("query {i} length {len} exceeds the option data")))?;
        queries.push(nbd_string(q, opt)?);
    }
    if c.remaining() != 0 {
        return Err(invalid(opt, format!("{} trailing bytes after the queries", c.remaining())));
    }
    Ok(MetaQuery { export, queries })
}

/// Parses an option's payload. `Err(InvalidOption)` means answer `NBD_REP_ERR_INVALID`;
/// `NBD_OPT_EXPORT_NAME` with a bad name cannot be answered and is reported by the caller as
/// fatal (see [`FatalError::ExportName`]).
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, InvalidOption> {
    let no_data = |name: &str, opt: ClientOption| {
        if data.is_empty() {
            Ok(opt)
        } else {
            Err(invalid(name, format!("carries {} bytes of data, expected none", data.len())))
        }
    };
    match option {
        OPT_EXPORT_NAME => Ok(ClientOption::ExportName(nbd_string(data, "NBD_OPT_EXPORT_NAME")?)),
        // The spec says ignore any data sent with ABORT.
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => no_data("NBD_OPT_LIST", ClientOption::List),
        OPT_STARTTLS => no_data("NBD_OPT_STARTTLS", ClientOption::StartTls),
        OPT_INFO => Ok(ClientOption::Info(parse_info(data, "NBD_OPT_INFO")?)),
        OPT_GO => Ok(ClientOption::Go(parse_info(data, "NBD_OPT_GO")?)),
        OPT_STRUCTURED_REPLY => no_data("NBD_OPT_STRUCTURED_REPLY", ClientOption::StructuredReply),
        OPT_LIST_META_CONTEXT => Ok(ClientOption::ListMetaContext(parse_meta(data, "NBD_OPT_LIST_META_CONTEXT")?)),
        OPT_SET_META_CONTEXT => Ok(ClientOption::SetMetaContext(parse_meta(data, "NBD_OPT_SET_META_CONTEXT")?)),
        other => Ok(ClientOption::Unsupported(other)),
    }
}

/// Which of a client's metadata-context queries select (`set == true`) or list `base:allocation`.
/// `base:` alone lists it but selects nothing; unknown namespaces are ignored.
pub fn meta_query_matches(queries: &[String], set: bool) -> bool {
    if queries.is_empty() {
        return !set;
    }
    queries.iter().any(|q| q == BASE_ALLOCATION || (!set && q == "base:"))
}

/// Appends one option reply to `out`.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an error option reply whose message is clipped to the protocol's string limit.
pub fn option_error(out: &mut Vec<u8>, option: u32, reply: u32, message: &str) {
    option_reply(out, option, reply, clip(message).as_bytes());
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    option_reply(out, option, REP_INFO, &d);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(out: &mut Vec<u8>, option: u32, min: u32, preferred: u32, max: u32) {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&min.to_be_bytes());
    d.extend_from_slice(&preferred.to_be_bytes());
    d.extend_from_slice(&max.to_be_bytes());
    option_reply(out, option, REP_INFO, &d);
}

/// Appends `NBD_REP_INFO` carrying a string (`NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`).
pub fn info_string(out: &mut Vec<u8>, option: u32, info: u16, s: &str) {
    let mut d = Vec::with_capacity(2 + s.len());
    d.extend_from_slice(&info.to_be_bytes());
    d.extend_from_slice(clip(s).as_bytes());
    option_reply(out, option, REP_INFO, &d);
}

/// Appends `NBD_REP_SERVER` for `NBD_OPT_LIST`.
pub fn rep_server(out: &mut Vec<u8>, name: &str, description: &str) {
    let mut d = Vec::with_capacity(4 + name.len() + description.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(description.as_bytes());
    option_reply(out, OPT_LIST, REP_SERVER, &d);
}

/// Appends `NBD_REP_META_CONTEXT`.
pub fn rep_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    option_reply(out, option, REP_META_CONTEXT, &d);
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes unless NO_ZEROES.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

fn clip(s: &str) -> &str {
    if s.len() <= MAX_STRING {
        return s;
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;

/// One transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, FatalError> {
    let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
    if magic != REQUEST_MAGIC {
        return Err(FatalError::RequestMagic(magic));
    }
    Ok(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().unwrap()),
        kind: u16::from_be_bytes(b[6..8].try_into().unwrap()),
        cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
        len: u32::from_be_bytes(b[24..28].try_into().unwrap()),
    })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.kind.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

/// What the connection negotiated, as far as request validation needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub size: u64,
    pub structured: bool,
    /// `base:allocation` was selected.
    pub meta_context: bool,
}

impl Negotiated {
    /// Transmission flags for this connection (DF is only offered with structured replies).
    pub fn flags(&self) -> u16 {
        if self.structured {
            EXPORT_FLAGS | FLAG_SEND_DF
        } else {
            EXPORT_FLAGS
        }
    }
}

/// What to do with a valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read { offset: u64, len: u32, df: bool },
    Flush,
    Disconnect,
    Cache { offset: u64, len: u32 },
    BlockStatus { offset: u64, len: u32, req_one: bool },
}

/// A request refused with an NBD error code; `drain` bytes of write payload must be consumed
/// from the stream before replying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub error: u32,
    pub message: String,
    pub drain: u32,
}

fn refuse(error: u32, message: impl Into<String>) -> Refusal {
    Refusal { error, message: message.into(), drain: 0 }
}

fn check_range(r: &Request, n: &Negotiated, what: &str) -> Result<(), Refusal> {
    if r.len == 0 {
        return Err(refuse(EINVAL, format!("{what} of zero length at offset {}", r.offset)));
    }
    match r.offset.checked_add(r.len as u64) {
        Some(end) if end <= n.size => Ok(()),
        _ => Err(refuse(EINVAL, format!("{what} of {} bytes at offset {} is past the end of the {}-byte export", r.len, r.offset, n.size))),
    }
}

/// Validates a request against the negotiated state. Pure: decides, never panics.
pub fn check_request(r: &Request, n: &Negotiated) -> Result<Command, Refusal> {
    match r.kind {
        CMD_READ => {
            if r.len > MAX_PAYLOAD {
                let e = if n.structured { EOVERFLOW } else { EINVAL };
                return Err(refuse(e, format!("read of {} bytes exceeds the {MAX_PAYLOAD}-byte maximum", r.len)));
            }
            check_range(r, n, "read")?;
            Ok(Command::Read { offset: r.offset, len: r.len, df: n.structured && r.flags & CMD_FLAG_DF != 0 })
        }
        CMD_WRITE => Err(Refusal { error: EPERM, message: "export is read-only".into(), drain: r.len }),
        CMD_TRIM | CMD_WRITE_ZEROES => Err(refuse(EPERM, "export is read-only")),
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH => Ok(Command::Flush),
        CMD_CACHE => {
            if r.len > MAX_PAYLOAD {
                return Err(refuse(EOVERFLOW, format!("cache request of {} bytes exceeds the {MAX_PAYLOAD}-byte maximum", r.len)));
            }
            check_range(r, n, "cache")?;
            Ok(Command::Cache { offset: r.offset, len: r.len })
        }
        CMD_BLOCK_STATUS => {
            if !n.structured || !n.meta_context {
                return Err(refuse(EINVAL, "block status without a negotiated base:allocation context"));
            }
            check_range(r, n, "block status")?;
            Ok(Command::BlockStatus { offset: r.offset, len: r.len, req_one: r.flags & CMD_FLAG_REQ_ONE != 0 })
        }
        other => Err(refuse(EINVAL, format!("unknown command {other}"))),
    }
}

/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;

pub fn simple_reply(out: &mut [u8], error: u32, cookie: u64) {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

pub fn simple_reply_vec(error: u32, cookie: u64) -> Vec<u8> {
    let mut v = vec![0u8; SIMPLE_REPLY_LEN];
    simple_reply(&mut v, error, cookie);
    v
}

pub fn structured_header(out: &mut [u8], flags: u16, kind: u16, cookie: u64, len: u32) {
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
}

/// A complete `NBD_REPLY_TYPE_ERROR` chunk (final).
pub fn structured_error(error: u32, cookie: u64, message: &str) -> Vec<u8> {
    let msg = clip(message).as_bytes();
    let mut v = vec![0u8; STRUCTURED_HEADER_LEN];
    structured_header(&mut v, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + msg.len() as u32);
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// A final `NBD_REPLY_TYPE_NONE` chunk (success without payload).
pub fn structured_done(cookie: u64) -> Vec<u8> {
    let mut v = vec![0u8; STRUCTURED_HEADER_LEN];
    structured_header(&mut v, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    v
}

/// An error reply in whichever form the connection negotiated.
pub fn error_reply(structured: bool, error: u32, cookie: u64, message: &str) -> Vec<u8> {
    if structured {
        structured_error(error, cookie, message)
    } else {
        simple_reply_vec(error, cookie)
    }
}

/// A success reply without payload in whichever form the connection negotiated.
pub fn ok_reply(structured: bool, cookie: u64) -> Vec<u8> {
    if structured {
        structured_done(cookie)
    } else {
        simple_reply_vec(0, cookie)
    }
}

/// A complete, final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for `base:allocation`.
/// `extents` are (length, flags) pairs.
pub fn block_status_reply(cookie: u64, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut v = vec![0u8; STRUCTURED_HEADER_LEN];
    structured_header(&mut v, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len as u32);
    v.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for (l, f) in extents {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&f.to_be_bytes());
    }
    v
}

/// Block-status extents of `[offset, offset+len)` for an image of `size` bytes in chunks of
/// `chunk_size`, where `is_zero(i)` says chunk `i` is all zeroes. Consecutive chunks of the same
/// kind are merged; extents never extend past the request or the export; `req_one` returns one.
pub fn allocation_extents(
    offset: u64,
    len: u32,
    size: u64,
    chunk_size: u32,
    req_one: bool,
    is_zero: impl Fn(u64) -> bool,
) -> Vec<(u32, u32)> {
    let end = offset.saturating_add(len as u64).min(size);
    let cs = chunk_size as u64;
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let idx = pos / cs;
        let chunk_end = ((idx + 1) * cs).min(end);
        let flags = if is_zero(idx) { STATE_HOLE | STATE_ZERO } else { 0 };
        let n = (chunk_end - pos) as u32;
        match out.last_mut() {
            Some((l, f)) if *f == flags => *l += n,
            _ => {
                if out.len() >= MAX_EXTENTS || (req_one && !out.is_empty()) {
                    break;
                }
                out.push((n, flags));
            }
        }
        pos = chunk_end;
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// Piece of a structured read reply: a run of data or a run of zeroes (a hole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u32,
    pub hole: bool,
}

/// Splits a read of `[offset, offset+len)` into alternating data and hole runs by chunk.
pub fn read_segments(offset: u64, len: u32, chunk_size: u32, is_zero: impl Fn(u64) -> bool) -> Vec<Segment> {
    let end = offset + len as u64;
    let cs = chunk_size as u64;
    let mut out: Vec<Segment> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let idx = pos / cs;
        let chunk_end = ((idx + 1) * cs).min(end);
        let hole = is_zero(idx);
        let n = (chunk_end - pos) as u32;
        match out.last_mut() {
            Some(s) if s.hole == hole => s.len += n,
            _ => out.push(Segment { offset: pos, len: n, hole }),
        }
        pos = chunk_end;
    }
    out
}

/// Bytes a structured read reply made of `segments` occupies on the wire.
pub fn structured_read_len(segments: &[Segment]) -> usize {
    segments.iter().map(|s| STRUCTURED_HEADER_LEN + if s.hole { 12 } else { 8 + s.len as usize }).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn negotiated() -> Negotiated {
        Negotiated { size: 10_000, structured: true, meta_context: true }
    }

    #[test]
    fn greeting_layout() {
        let g = greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags([0, 0, 0, 3]).unwrap(), ClientFlags { fixed_newstyle: true, no_zeroes: true });
        assert_eq!(parse_client_flags([0, 0, 0, 4]), Err(FatalError::ClientFlags(4)));
    }

    #[test]
    fn go_parses_and_rejects_truncation() {
        let mut d = Vec::new();
        d.extend_from_slice(&4u32.to_be_bytes());
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(parse_option(OPT_GO, &d).unwrap(), ClientOption::Go(InfoRequest { name: "disk".into(), requests: vec![3, 1] }));
        assert!(parse_option(OPT_GO, &d[..d.len() - 1]).is_err());
        let mut bad = d.clone();
        bad[3] = 200; // name length beyond the data
        assert!(parse_option(OPT_INFO, &bad).is_err());
    }

    #[test]
    fn meta_context_parses() {
        let mut d = Vec::new();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(b"x");
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:a"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let ClientOption::SetMetaContext(m) = parse_option(OPT_SET_META_CONTEXT, &d).unwrap() else { panic!() };
        assert_eq!(m.export, "x");
        assert!(meta_query_matches(&m.queries, true));
        assert!(!meta_query_matches(&["base:".to_string()], true));
        assert!(meta_query_matches(&["base:".to_string()], false));
        assert!(meta_query_matches(&[], false));
        assert!(!meta_query_matches(&[], true));
        d.push(0);
        assert!(parse_option(OPT_SET_META_CONTEXT, &d).is_err());
    }

    #[test]
    fn unknown_and_dataful_options() {
        assert_eq!(parse_option(12345, b"junk").unwrap(), ClientOption::Unsupported(12345));
        assert_eq!(parse_option(OPT_EXTENDED_HEADERS, b"").unwrap(), ClientOption::Unsupported(OPT_EXTENDED_HEADERS));
        assert!(parse_option(OPT_LIST, b"x").is_err());
        assert!(parse_option(OPT_STRUCTURED_REPLY, b"x").is_err());
        assert_eq!(parse_option(OPT_ABORT, b"x").unwrap(), ClientOption::Abort);
        assert!(parse_option(OPT_EXPORT_NAME, &[0xff, 0xfe]).is_err());
    }

    #[test]
    fn request_validation() {
        let n = negotiated();
        let r = |kind, offset, len| Request { flags: 0, kind, cookie: 7, offset, len };
        assert_eq!(check_request(&r(CMD_READ, 0, 10_000), &n), Ok(Command::Read { offset: 0, len: 10_000, df: false }));
        assert_eq!(check_request(&r(CMD_READ, 1, 10_000), &n).unwrap_err().error, EINVAL);
        assert_eq!(check_request(&r(CMD_READ, u64::MAX, 2), &n).unwrap_err().error, EINVAL);
        assert_eq!(check_request(&r(CMD_READ, 0, 0), &n).unwrap_err().error, EINVAL);
        assert_eq!(check_request(&r(CMD_READ, 0, MAX_PAYLOAD + 1), &n).unwrap_err().error, EOVERFLOW);
        let w = check_request(&r(CMD_WRITE, 0, 512), &n).unwrap_err();
        assert_eq!((w.error, w.drain), (EPERM, 512));
        assert_eq!(check_request(&r(CMD_TRIM, 0, 512), &n).unwrap_err().error, EPERM);
        assert_eq!(check_request(&r(CMD_WRITE_ZEROES, 0, 512), &n).unwrap_err().error, EPERM);
        assert_eq!(check_request(&r(99, 0, 512), &n).unwrap_err().error, EINVAL);
        assert_eq!(check_request(&r(CMD_CACHE, 0, 512), &n), Ok(Command::Cache { offset: 0, len: 512 }));
        assert_eq!(check_request(&r(CMD_CACHE, 0, MAX_PAYLOAD + 1), &n).unwrap_err().error, EOVERFLOW);
        assert_eq!(check_request(&r(CMD_FLUSH, 0, 0), &n), Ok(Command::Flush));
        assert_eq!(check_request(&r(CMD_DISC, 0, 0), &n), Ok(Command::Disconnect));
        let simple = Negotiated { structured: false, meta_context: false, ..n };
        assert_eq!(check_request(&r(CMD_BLOCK_STATUS, 0, 512), &simple).unwrap_err().error, EINVAL);
        assert_eq!(check_request(&r(CMD_READ, 0, MAX_PAYLOAD + 1), &simple).unwrap_err().error, EINVAL);
    }

    #[test]
    fn extents_merge_and_clip() {
        // chunks: 0 data, 1 zero, 2 zero, 3 data; size 3.5 chunks of 100
        let z = |i: u64| i == 1 || i == 2;
        assert_eq!(allocation_extents(50, 300, 350, 100, false, z), vec![(50, 0), (200, 3), (50, 0)]);
        assert_eq!(allocation_extents(50, 300, 350, 100, true, z), vec![(50, 0)]);
        assert_eq!(allocation_extents(300, 1000, 350, 100, false, z), vec![(50, 0)]);
        let segs = read_segments(50, 300, 100, z);
        assert_eq!(
            segs,
            vec![
                Segment { offset: 50, len: 50, hole: false },
                Segment { offset: 100, len: 200, hole: true },
                Segment { offset: 300, len: 50, hole: false }
            ]
        );
        assert_eq!(structured_read_len(&segs), 20 + 8 + 50 + 20 + 12 + 20 + 8 + 50);
    }

    proptest! {
        #[test]
        fn option_parser_never_panics(option in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_option(option, &data);
            let _ = parse_option(option % 16, &data);
        }

        #[test]
        fn option_header_roundtrip(option in any::<u32>(), len in any::<u32>(), garbage in any::<[u8; 16]>()) {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
            b[8..12].copy_from_slice(&option.to_be_bytes());
            b[12..16].copy_from_slice(&len.to_be_bytes());
            prop_assert_eq!(parse_option_header(&b).unwrap(), OptionHeader { option, len });
            if garbage[0..8] != IHAVEOPT.to_be_bytes() {
                prop_assert!(parse_option_header(&garbage).is_err());
            }
        }

        #[test]
        fn request_parser_never_panics_and_roundtrips(b in any::<[u8; 28]>(), flags in any::<u16>(), kind in any::<u16>(),
                                                     cookie in any::<u64>(), offset in any::<u64>(), len in any::<u32>()) {
            if let Ok(r) = parse_request(&b) {
                let _ = check_request(&r, &negotiated());
            }
            let r = Request { flags, kind, cookie, offset, len };
            prop_assert_eq!(parse_request(&encode_request(&r)).unwrap(), r);
        }

        #[test]
        fn accepted_reads_stay_inside_the_export(offset in any::<u64>(), len in any::<u32>(), size in any::<u64>(), structured in any::<bool>()) {
            let n = Negotiated { size, structured, meta_context: structured };
            let r = Request { flags: CMD_FLAG_DF, kind: CMD_READ, cookie: 1, offset, len };
            match check_request(&r, &n) {
                Ok(Command::Read { offset: o, len: l, .. }) => {
                    prop_assert!(l > 0 && l <= MAX_PAYLOAD);
                    prop_assert!(o.checked_add(l as u64).unwrap() <= size);
                }
                Ok(other) => prop_assert!(false, "unexpected {:?}", other),
                Err(e) => prop_assert!(e.error == EINVAL || e.error == EOVERFLOW),
            }
        }

        #[test]
        fn extents_cover_request_exactly(offset in 0u64..5000, len in 1u32..5000, mask in any::<u64>(), req_one in any::<bool>()) {
            let size = 4000u64;
            prop_assume!(offset < size);
            let ext = allocation_extents(offset, len, size, 64, req_one, |i| mask >> (i % 64) & 1 == 1);
            let total: u64 = ext.iter().map(|e| e.0 as u64).sum();
            prop_assert!(!ext.is_empty());
            prop_assert!(ext.iter().all(|e| e.0 > 0));
            if req_one {
                prop_assert_eq!(ext.len(), 1);
                prop_assert!(total <= len as u64);
            } else {
                prop_assert_eq!(total, (offset + len as u64).min(size) - offset);
            }
            let segs = read_segments(offset, len.min((size - offset) as u32), 64, |i| mask >> (i % 64) & 1 == 1);
            let seg_total: u64 = segs.iter().map(|s| s.len as u64).sum();
            prop_assert_eq!(seg_total, len.min((size - offset) as u32) as u64);
        }
    }
}
