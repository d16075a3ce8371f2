//! Checks on a plugin file's bytes, made before the dynamic loader sees them: that they are a
//! complete ELF shared object for this machine, and that it exports `TRELLIS_SDK_ABI_VERSION`.
//!
//! `dlopen` maps a file's segments and runs its initialisers before anyone can ask it for a
//! symbol; a file cut short maps pages past its end, which the first touch turns into SIGBUS.
//! Everything here reads the bytes through bounds-checked accessors only, so no input can make
//! it panic or read out of bounds, and a foreign library (libz, an executable) is refused
//! without any of its code running.
//!
//! The symbol is looked up the way the dynamic loader looks it up: through `PT_DYNAMIC`
//! (`DT_SYMTAB`, `DT_STRTAB`, with `DT_HASH` or `DT_GNU_HASH` for the number of symbols), not
//! through section headers, which the loader ignores and `strip` may remove.

use trellis_sdk::abi::ABI_VERSION_SYMBOL;

/// Why a file's bytes are not loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not an ELF shared object this machine can load; the text says what it is instead.
    NotLoadable(String),
    /// Something the headers promise lies past the end of the file; the text says what.
    Truncated(String),
    /// A complete shared object for this machine that does not export the ABI symbol.
    NotAPlugin,
}

const MAGIC: &[u8; 4] = b"\x7fELF";
const EHDR_SIZE: u64 = 64;
const PHDR_SIZE: u64 = 56;
const SHDR_SIZE: u64 = 64;
const SYM_SIZE: u64 = 24;
const DYN_SIZE: u64 = 16;

const ET_REL: u16 = 1;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const ET_CORE: u16 = 4;
const PN_XNUM: u16 = 0xffff;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;

const SHT_NULL: u32 = 0;
const SHT_NOBITS: u32 = 8;

const DT_NULL: u64 = 0;
const DT_HASH: u64 = 4;
const DT_STRTAB: u64 = 5;
const DT_SYMTAB: u64 = 6;
const DT_STRSZ: u64 = 10;
const DT_SYMENT: u64 = 11;
const DT_GNU_HASH: u64 = 0x6fff_fef5;
const DT_FLAGS_1: u64 = 0x6fff_fffb;
const DF_1_PIE: u64 = 0x0800_0000;

const STB_GLOBAL: u8 = 1;
const STB_WEAK: u8 = 2;
const STB_GNU_UNIQUE: u8 = 10;
const SHN_UNDEF: u16 = 0;

/// `e_machine` of the machine this trellis was built for (`None`: not checked).
const HOST_MACHINE: Option<u16> = if cfg!(target_arch = "x86_64") {
    Some(62)
} else if cfg!(target_arch = "aarch64") {
    Some(183)
} else if cfg!(target_arch = "riscv64") {
    Some(243)
} else if cfg!(target_arch = "powerpc64") {
    Some(21)
} else if cfg!(target_arch = "s390x") {
    Some(22)
} else if cfg!(target_arch = "loongarch64") {
    Some(258)
} else {
    None
};

fn machine_name(machine: u16) -> String {
    match machine {
        3 => "x86 (32-bit)".to_string(),
        8 => "MIPS".to_string(),
        20 => "PowerPC (32-bit)".to_string(),
        21 => "PowerPC (64-bit)".to_string(),
        22 => "s390x".to_string(),
        40 => "ARM (32-bit)".to_string(),
        62 => "x86_64".to_string(),
        183 => "aarch64".to_string(),
        243 => "RISC-V".to_string(),
        258 => "LoongArch".to_string(),
        other => format!("ELF machine {other}"),
    }
}

fn segment_kind(p_type: u32) -> String {
    match p_type {
        0 => "PT_NULL".to_string(),
        PT_LOAD => "PT_LOAD".to_string(),
        PT_DYNAMIC => "PT_DYNAMIC".to_string(),
        3 => "PT_INTERP".to_string(),
        4 => "PT_NOTE".to_string(),
        6 => "PT_PHDR".to_string(),
        7 => "PT_TLS".to_string(),
        0x6474_e550 => "PT_GNU_EH_FRAME".to_string(),
        0x6474_e551 => "PT_GNU_STACK".to_string(),
        0x6474_e552 => "PT_GNU_RELRO".to_string(),
        0x6474_e553 => "PT_GNU_PROPERTY".to_string(),
        other => format!("type {other:#x}"),
    }
}

/// The symbol every plugin exports (`trellis_sdk::export_plugin!`), without its NUL.
fn plugin_symbol() -> &'static [u8] {
    ABI_VERSION_SYMBOL
        .strip_suffix(b"\0")
        .unwrap_or(ABI_VERSION_SYMBOL)
}

/// Little-endian reads that return `None` instead of reading past the end.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }

    fn slice(&self, at: u64, len: u64) -> Option<&[u8]> {
        let start = usize::try_from(at).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.0.get(start..end)
    }

    fn array<const N: usize>(&self, at: u64) -> Option<[u8; N]> {
        self.slice(at, N as u64)?.try_into().ok()
    }

    fn u8(&self, at: u64) -> Option<u8> {
        Some(self.array::<1>(at)?[0])
    }

    fn u16(&self, at: u64) -> Option<u16> {
        self.array(at).map(u16::from_le_bytes)
    }

    fn u32(&self, at: u64) -> Option<u32> {
        self.array(at).map(u32::from_le_bytes)
    }

    fn u64(&self, at: u64) -> Option<u64> {
        self.array(at).map(u64::from_le_bytes)
    }

    /// The NUL-terminated string at `at`, not reading at or past `limit`.
    fn c_str(&self, at: u64, limit: u64) -> Option<&[u8]> {
        let limit = limit.min(self.len());
        let rest = self.slice(at, limit.checked_sub(at)?)?;
        let end = rest.iter().position(|&b| b == 0)?;
        Some(&rest[..end])
    }
}

/// `start + len` as a position that cannot overflow: the end of a range a header describes.
fn end_of(start: u64, count: u64, size: u64) -> u128 {
    u128::from(start) + u128::from(count) * u128::from(size)
}

fn malformed(what: &str) -> Refusal {
    Refusal::NotLoadable(format!("not a well-formed shared library: {what}"))
}

struct Segment {
    p_type: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// Checks `bytes` as a plugin for this machine, without loading them.
pub fn check(bytes: &[u8]) -> Result<(), Refusal> {
    let b = Bytes(bytes);
    let len = b.len();
    header(&b)?;

    // The table's position was checked against the file by `header`.
    let phoff = b.u64(32).unwrap_or(0);
    let phnum = u64::from(b.u16(56).unwrap_or(0));
    let mut segments = Vec::new();
    for i in 0..phnum {
        let at = phoff + i * PHDR_SIZE;
        let read = |field: u64| b.u64(at + field).unwrap_or(0);
        let segment = Segment {
            p_type: b.u32(at).unwrap_or(0),
            offset: read(8),
            vaddr: read(16),
            filesz: read(32),
        };
        let end = end_of(segment.offset, 1, segment.filesz);
        if segment.filesz > 0 && end > u128::from(len) {
            return Err(Refusal::Truncated(format!(
                "segment {i} ({}) ends at byte {end} but the file has {len} bytes",
                segment_kind(segment.p_type)
            )));
        }
        segments.push(segment);
    }
    if !segments.iter().any(|s| s.p_type == PT_LOAD) {
        return Err(Refusal::NotLoadable(
            "not a shared library: it has no loadable segment".to_string(),
        ));
    }
    sections(&b)?;
    exports_plugin_symbol(&b, &segments)
}

/// The ELF header, and that the program header table lies within the file.
fn header(b: &Bytes) -> Result<(), Refusal> {
    let len = b.len();
    if len == 0 {
        return Err(Refusal::NotLoadable(
            "the file is empty, not a shared library".to_string(),
        ));
    }
    let head = &b.0[..b.0.len().min(MAGIC.len())];
    if !MAGIC.starts_with(head) {
        return Err(Refusal::NotLoadable(
            "not a shared library: it does not start with the ELF magic bytes (\\x7fELF)"
                .to_string(),
        ));
    }
    match b.u8(4) {
        None | Some(2) => {}
        Some(1) => {
            return Err(Refusal::NotLoadable(
                "a 32-bit ELF file; this machine loads 64-bit shared libraries".to_string(),
            ))
        }
        Some(other) => return Err(malformed(&format!("unknown ELF class {other}"))),
    }
    match b.u8(5) {
        None | Some(1) => {}
        Some(2) => {
            return Err(Refusal::NotLoadable(
                "a big-endian ELF file; this machine loads little-endian shared libraries"
                    .to_string(),
            ))
        }
        Some(other) => return Err(malformed(&format!("unknown ELF data encoding {other}"))),
    }
    match b.u8(6) {
        None | Some(1) => {}
        Some(other) => return Err(malformed(&format!("unknown ELF version {other}"))),
    }
    if len < EHDR_SIZE {
        return Err(Refusal::Truncated(format!(
            "the ELF header needs {EHDR_SIZE} bytes but the file has {len} bytes"
        )));
    }
    let field16 = |at: u64| b.u16(at).unwrap_or(0);
    match field16(16) {
        ET_DYN => {}
        ET_EXEC => {
            return Err(Refusal::NotLoadable(
                "an executable, not a shared library".to_string(),
            ))
        }
        ET_REL => {
            return Err(Refusal::NotLoadable(
                "an object file (.o), not a shared library".to_string(),
            ))
        }
        ET_CORE => {
            return Err(Refusal::NotLoadable(
                "a core dump, not a shared library".to_string(),
            ))
        }
        other => {
            return Err(Refusal::NotLoadable(format!(
                "an ELF file of type {other:#x}, not a shared library"
            )))
        }
    }
    let machine = field16(18);
    if let Some(host) = HOST_MACHINE {
        if machine != host {
            return Err(Refusal::NotLoadable(format!(
                "a shared library for {}, but this machine is {}",
                machine_name(machine),
                machine_name(host)
            )));
        }
    }
    let version = b.u32(20).unwrap_or(0);
    if version != 1 {
        return Err(malformed(&format!("unknown ELF version {version}")));
    }

    let phoff = b.u64(32).unwrap_or(0);
    let phentsize = field16(54);
    let phnum = field16(56);
    if phnum == 0 {
        return Err(Refusal::NotLoadable(
            "not a shared library: it has no program headers".to_string(),
        ));
    }
    if phnum == PN_XNUM {
        return Err(malformed("more than 65534 program headers"));
    }
    if u64::from(phentsize) != PHDR_SIZE {
        return Err(malformed(&format!(
            "program headers of {phentsize} bytes (ELF64's are {PHDR_SIZE})"
        )));
    }
    let end = end_of(phoff, u64::from(phnum), PHDR_SIZE);
    if end > u128::from(len) {
        return Err(Refusal::Truncated(format!(
            "the program header table ends at byte {end} but the file has {len} bytes"
        )));
    }

    Ok(())
}

/// The number of section headers: `e_shnum`, or, when that is 0, section 0's `sh_size`
/// (`None`: section 0 is past the end of the file).
fn section_count(b: &Bytes) -> Option<u64> {
    match b.u16(60)? {
        0 => b.u64(b.u64(40)? + 32),
        n => Some(u64::from(n)),
    }
}

/// That the section header table, and every section with bytes in the file, lie within it
/// (the loader ignores sections, but debuggers and backtraces read them from the loaded file).
fn sections(b: &Bytes) -> Result<(), Refusal> {
    let shoff = b.u64(40).unwrap_or(0);
    if shoff == 0 {
        return Ok(());
    }
    let len = b.len();
    let shentsize = b.u16(58).unwrap_or(0);
    if u64::from(shentsize) != SHDR_SIZE {
        return Err(malformed(&format!(
            "section headers of {shentsize} bytes (ELF64's are {SHDR_SIZE})"
        )));
    }
    let end = end_of(shoff, section_count(b).unwrap_or(1), SHDR_SIZE);
    if end > u128::from(len) {
        return Err(Refusal::Truncated(format!(
            "the section header table ends at byte {end} but the file has {len} bytes"
        )));
    }
    let count = section_count(b).unwrap_or(0);
    for i in 0..count {
        let at = shoff + i * SHDR_SIZE;
        let sh_type = b.u32(at + 4).unwrap_or(SHT_NULL);
        if sh_type == SHT_NULL || sh_type == SHT_NOBITS {
            continue;
        }
        let offset = b.u64(at + 24).unwrap_or(0);
        let size = b.u64(at + 32).unwrap_or(0);
        let end = end_of(offset, 1, size);
        if end > u128::from(len) {
            let name = section_name(b, at)
                .map(|n| format!("section {i} ({n})"))
                .unwrap_or_else(|| format!("section {i}"));
            return Err(Refusal::Truncated(format!(
                "{name} ends at byte {end} but the file has {len} bytes"
            )));
        }
    }
    Ok(())
}

/// A section's name from the section name table, when everything needed is in the file.
fn section_name(b: &Bytes, header_at: u64) -> Option<String> {
    let shoff = b.u64(40)?;
    let strndx = u64::from(b.u16(62)?);
    if strndx == 0 || strndx >= section_count(b)? {
        return None;
    }
    let table = shoff + strndx * SHDR_SIZE;
    let (offset, size) = (b.u64(table + 24)?, b.u64(table + 32)?);
    let name = b.c_str(
        offset.checked_add(u64::from(b.u32(header_at)?))?,
        offset.checked_add(size)?,
    )?;
    Some(String::from_utf8_lossy(name).into_owned())
}

/// The file offset of virtual address `vaddr`, and how many of the segment's file bytes
/// follow it.
fn file_offset(segments: &[Segment], vaddr: u64) -> Option<(u64, u64)> {
    segments
        .iter()
        .filter(|s| s.p_type == PT_LOAD)
        .find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.filesz)
        .map(|s| (s.offset + (vaddr - s.vaddr), s.filesz - (vaddr - s.vaddr)))
}

/// Looks `TRELLIS_SDK_ABI_VERSION` up in the dynamic symbol table, as `dlsym` would.
fn exports_plugin_symbol(b: &Bytes, segments: &[Segment]) -> Result<(), Refusal> {
    let Some(dynamic) = segments.iter().find(|s| s.p_type == PT_DYNAMIC) else {
        // Without a dynamic section nothing can be looked up in it.
        return Err(Refusal::NotAPlugin);
    };
    let mut tags = std::collections::BTreeMap::new();
    for i in 0..dynamic.filesz / DYN_SIZE {
        let at = dynamic.offset + i * DYN_SIZE;
        let (Some(tag), Some(value)) = (b.u64(at), b.u64(at + 8)) else {
            break;
        };
        if tag == DT_NULL {
            break;
        }
        tags.entry(tag).or_insert(value);
    }
    if tags.get(&DT_FLAGS_1).is_some_and(|f| f & DF_1_PIE != 0) {
        return Err(Refusal::NotLoadable(
            "a position-independent executable, not a shared library".to_string(),
        ));
    }
    let (Some(&symtab), Some(&strtab)) = (tags.get(&DT_SYMTAB), tags.get(&DT_STRTAB)) else {
        return Err(Refusal::NotAPlugin);
    };
    if tags.get(&DT_SYMENT).is_some_and(|&s| s != SYM_SIZE) {
        return Err(malformed("dynamic symbols that are not 24 bytes each"));
    }
    let symbols = match (tags.get(&DT_HASH), tags.get(&DT_GNU_HASH)) {
        (Some(&hash), _) => sysv_symbol_count(b, segments, hash),
        (None, Some(&hash)) => gnu_symbol_count(b, segments, hash),
        // Without a hash table the loader cannot look any symbol up.
        (None, None) => return Err(Refusal::NotAPlugin),
    }
    .ok_or_else(|| malformed("its symbol hash table lies outside the file"))?;

    let (symtab, symtab_bytes) = file_offset(segments, symtab)
        .ok_or_else(|| malformed("its dynamic symbol table lies outside the loaded segments"))?;
    if u128::from(symbols) * u128::from(SYM_SIZE) > u128::from(symtab_bytes) {
        return Err(malformed(
            "its dynamic symbol table runs past the end of its segment",
        ));
    }
    let (strtab, strtab_bytes) = file_offset(segments, strtab)
        .ok_or_else(|| malformed("its dynamic string table lies outside the loaded segments"))?;
    let strtab_end = strtab + tags.get(&DT_STRSZ).copied().unwrap_or(0).min(strtab_bytes);

    let wanted = plugin_symbol();
    for i in 1..symbols {
        let at = symtab + i * SYM_SIZE;
        let (Some(name), Some(info), Some(shndx)) = (b.u32(at), b.u8(at + 4), b.u16(at + 6)) else {
            break;
        };
        let bind = info >> 4;
        if shndx == SHN_UNDEF || !matches!(bind, STB_GLOBAL | STB_WEAK | STB_GNU_UNIQUE) {
            continue;
        }
        let name = strtab
            .checked_add(u64::from(name))
            .and_then(|at| b.c_str(at, strtab_end));
        if name == Some(wanted) {
            return Ok(());
        }
    }
    Err(Refusal::NotAPlugin)
}

/// `nchain` of a `DT_HASH` table: the number of dynamic symbols.
fn sysv_symbol_count(b: &Bytes, segments: &[Segment], hash: u64) -> Option<u64> {
    let (at, _) = file_offset(segments, hash)?;
    b.u32(at + 4).map(u64::from)
}

/// The number of dynamic symbols a `DT_GNU_HASH` table covers: one past the last symbol of
/// the longest chain of the highest bucket.
fn gnu_symbol_count(b: &Bytes, segments: &[Segment], hash: u64) -> Option<u64> {
    let (at, available) = file_offset(segments, hash)?;
    let nbuckets = u64::from(b.u32(at)?);
    let symoffset = u64::from(b.u32(at + 4)?);
    let bloom_words = u64::from(b.u32(at + 8)?);
    let buckets_at = at
        .checked_add(16)?
        .checked_add(bloom_words.checked_mul(8)?)?;
    let chains_at = buckets_at.checked_add(nbuckets.checked_mul(4)?)?;
    if chains_at - at > available {
        return None;
    }
    let buckets = b.slice(buckets_at, nbuckets * 4)?;
    let last = buckets
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .max()
        .unwrap_or(0);
    let mut symbol = u64::from(last);
    if symbol == 0 {
        return Some(symoffset);
    }
    if symbol < symoffset {
        return None;
    }
    loop {
        let chain = b.u32(chains_at.checked_add((symbol - symoffset).checked_mul(4)?)?)?;
        if chain & 1 == 1 {
            return Some(symbol + 1);
        }
        symbol += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How the test library's symbols are hashed.
    #[derive(Clone, Copy)]
    enum Hash {
        Sysv,
        Gnu,
    }

    struct Symbol {
        name: &'static str,
        bind: u8,
        shndx: u16,
    }

    fn exported(name: &'static str) -> Symbol {
        Symbol {
            name,
            bind: STB_GLOBAL,
            shndx: 1,
        }
    }

    const PLUGIN: &str = "TRELLIS_SDK_ABI_VERSION";

    fn put16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn gnu_hash(name: &str) -> u32 {
        name.bytes().fold(5381u32, |h, c| {
            h.wrapping_mul(33).wrapping_add(u32::from(c))
        })
    }

    /// The smallest shared object the dynamic loader could look `symbols` up in: an ELF
    /// header, a PT_LOAD covering the whole file at address 0 (so addresses are offsets), a
    /// PT_DYNAMIC, a hash table, the symbols and their names.
    fn library(symbols: &[Symbol], hash: Hash, extra_dynamic: &[(u64, u64)]) -> Vec<u8> {
        let phoff = EHDR_SIZE as usize;
        let dynamic = phoff + 2 * PHDR_SIZE as usize;
        let dynamic_len = (6 + extra_dynamic.len()) * DYN_SIZE as usize;
        let hash_at = dynamic + dynamic_len;
        let nsyms = symbols.len() + 1;
        let hash_len = match hash {
            Hash::Sysv => 4 * (2 + 1 + nsyms),
            // nbuckets, symoffset, bloom size, bloom shift, one bloom word, one bucket, chains.
            Hash::Gnu => 16 + 8 + 4 + 4 * symbols.len(),
        };
        let symtab = hash_at + hash_len;
        let strtab = symtab + nsyms * SYM_SIZE as usize;
        let mut names = vec![0u8];
        let mut name_at = Vec::new();
        for s in symbols {
            name_at.push(names.len() as u32);
            names.extend_from_slice(s.name.as_bytes());
            names.push(0);
        }
        let total = strtab + names.len();
        let mut b = vec![0u8; total];

        b[..4].copy_from_slice(MAGIC);
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        put16(&mut b, 16, ET_DYN);
        put16(&mut b, 18, HOST_MACHINE.unwrap_or(62));
        put32(&mut b, 20, 1);
        put64(&mut b, 32, phoff as u64);
        put16(&mut b, 52, EHDR_SIZE as u16);
        put16(&mut b, 54, PHDR_SIZE as u16);
        put16(&mut b, 56, 2);
        put16(&mut b, 58, SHDR_SIZE as u16);

        let segment = |b: &mut Vec<u8>, i: usize, p_type: u32, offset: usize, size: usize| {
            let at = phoff + i * PHDR_SIZE as usize;
            put32(b, at, p_type);
            put64(b, at + 8, offset as u64);
            put64(b, at + 16, offset as u64);
            put64(b, at + 24, offset as u64);
            put64(b, at + 32, size as u64);
            put64(b, at + 40, size as u64);
        };
        segment(&mut b, 0, PT_LOAD, 0, total);
        segment(&mut b, 1, PT_DYNAMIC, dynamic, dynamic_len);

        let hash_tag = match hash {
            Hash::Sysv => DT_HASH,
            Hash::Gnu => DT_GNU_HASH,
        };
        let mut entries = vec![
            (hash_tag, hash_at as u64),
            (DT_STRTAB, strtab as u64),
            (DT_SYMTAB, symtab as u64),
            (DT_STRSZ, names.len() as u64),
            (DT_SYMENT, SYM_SIZE),
        ];
        entries.extend_from_slice(extra_dynamic);
        entries.push((DT_NULL, 0));
        for (i, (tag, value)) in entries.into_iter().enumerate() {
            put64(&mut b, dynamic + 16 * i, tag);
            put64(&mut b, dynamic + 16 * i + 8, value);
        }

        match hash {
            Hash::Sysv => {
                // One bucket chaining every symbol: 1 → 2 → … → n → 0.
                put32(&mut b, hash_at, 1);
                put32(&mut b, hash_at + 4, nsyms as u32);
                put32(&mut b, hash_at + 8, u32::from(!symbols.is_empty()));
                for i in 1..nsyms {
                    let next = if i + 1 < nsyms { i + 1 } else { 0 };
                    put32(&mut b, hash_at + 12 + 4 * i, next as u32);
                }
            }
            Hash::Gnu => {
                put32(&mut b, hash_at, 1);
                put32(&mut b, hash_at + 4, 1);
                put32(&mut b, hash_at + 8, 1);
                put32(&mut b, hash_at + 12, 6);
                put64(&mut b, hash_at + 16, u64::MAX);
                put32(&mut b, hash_at + 24, u32::from(!symbols.is_empty()));
                for (i, s) in symbols.iter().enumerate() {
                    let last = u32::from(i + 1 == symbols.len());
                    put32(&mut b, hash_at + 28 + 4 * i, (gnu_hash(s.name) & !1) | last);
                }
            }
        }

        for (i, s) in symbols.iter().enumerate() {
            let at = symtab + (i + 1) * SYM_SIZE as usize;
            put32(&mut b, at, name_at[i]);
            b[at + 4] = (s.bind << 4) | 1;
            put16(&mut b, at + 6, s.shndx);
            put64(&mut b, at + 16, 4);
        }
        b[strtab..].copy_from_slice(&names);
        b
    }

    fn plugin() -> Vec<u8> {
        library(&[exported("compress"), exported(PLUGIN)], Hash::Sysv, &[])
    }

    /// Appends a section header table: the null section and one section with `offset`/`size`.
    fn with_sections(mut b: Vec<u8>, sh_type: u32, offset: u64, size: u64) -> Vec<u8> {
        let shoff = b.len();
        b.resize(shoff + 2 * SHDR_SIZE as usize, 0);
        let at = shoff + SHDR_SIZE as usize;
        put32(&mut b, at + 4, sh_type);
        put64(&mut b, at + 24, offset);
        put64(&mut b, at + 32, size);
        put64(&mut b, 40, shoff as u64);
        put16(&mut b, 60, 2);
        b
    }

    fn not_loadable(b: &[u8], phrase: &str) {
        match check(b) {
            Err(Refusal::NotLoadable(what)) => assert!(what.contains(phrase), "{what}"),
            other => panic!("expected NotLoadable({phrase:?}), got {other:?}"),
        }
    }

    fn truncated(b: &[u8], phrase: &str) {
        match check(b) {
            Err(Refusal::Truncated(what)) => assert!(what.contains(phrase), "{what}"),
            other => panic!("expected Truncated({phrase:?}), got {other:?}"),
        }
    }

    #[test]
    fn a_minimal_plugin_passes_with_either_hash_table() {
        assert_eq!(check(&plugin()), Ok(()));
        let gnu = library(
            &[exported("a"), exported(PLUGIN), exported("b")],
            Hash::Gnu,
            &[],
        );
        assert_eq!(check(&gnu), Ok(()));
        let len = plugin().len() as u64;
        assert_eq!(check(&with_sections(plugin(), 1, 64, len - 64)), Ok(()));
    }

    #[test]
    fn a_library_without_the_abi_symbol_is_not_a_plugin() {
        for hash in [Hash::Sysv, Hash::Gnu] {
            let foreign = library(&[exported("deflate"), exported("inflate")], hash, &[]);
            assert_eq!(check(&foreign), Err(Refusal::NotAPlugin));
            assert_eq!(check(&library(&[], hash, &[])), Err(Refusal::NotAPlugin));
        }
        // Imported, not exported; or local.
        let undefined = Symbol {
            shndx: SHN_UNDEF,
            ..exported(PLUGIN)
        };
        assert_eq!(
            check(&library(&[undefined], Hash::Sysv, &[])),
            Err(Refusal::NotAPlugin)
        );
        let local = Symbol {
            bind: 0,
            ..exported(PLUGIN)
        };
        assert_eq!(
            check(&library(&[local], Hash::Gnu, &[])),
            Err(Refusal::NotAPlugin)
        );
        // A longer name that starts with the symbol's.
        let longer = library(&[exported("TRELLIS_SDK_ABI_VERSION_2")], Hash::Sysv, &[]);
        assert_eq!(check(&longer), Err(Refusal::NotAPlugin));
        // No dynamic segment at all.
        let mut b = plugin();
        put32(&mut b, 64 + PHDR_SIZE as usize, 4);
        assert_eq!(check(&b), Err(Refusal::NotAPlugin));
    }

    #[test]
    fn each_header_field_is_checked() {
        not_loadable(&[], "empty");
        not_loadable(b"not a library\n", "ELF magic");
        not_loadable(b"\x7fEL_", "ELF magic");
        let field = |at: usize, value: &[u8]| {
            let mut b = plugin();
            b[at..at + value.len()].copy_from_slice(value);
            b
        };
        not_loadable(&field(4, &[1]), "32-bit");
        not_loadable(&field(4, &[7]), "unknown ELF class 7");
        not_loadable(&field(5, &[2]), "big-endian");
        not_loadable(&field(6, &[0]), "unknown ELF version 0");
        not_loadable(&field(16, &ET_EXEC.to_le_bytes()), "an executable");
        not_loadable(&field(16, &ET_REL.to_le_bytes()), "object file");
        not_loadable(&field(16, &ET_CORE.to_le_bytes()), "core dump");
        not_loadable(&field(16, &9u16.to_le_bytes()), "type 0x9");
        let other = if HOST_MACHINE == Some(183) {
            62u16
        } else {
            183
        };
        not_loadable(&field(18, &other.to_le_bytes()), "but this machine is");
        not_loadable(&field(20, &2u32.to_le_bytes()), "unknown ELF version 2");
        not_loadable(
            &field(54, &32u16.to_le_bytes()),
            "program headers of 32 bytes",
        );
        not_loadable(&field(56, &0u16.to_le_bytes()), "no program headers");
        not_loadable(&field(56, &PN_XNUM.to_le_bytes()), "65534");
        truncated(
            &field(32, &u64::MAX.to_le_bytes()),
            "program header table ends at byte",
        );
        truncated(
            &field(56, &100u16.to_le_bytes()),
            "program header table ends at byte",
        );
        // Section headers: the table itself, and a section, past the end.
        let len = plugin().len() as u64;
        truncated(
            &field(40, &(len - 8).to_le_bytes()),
            "section header table ends at byte",
        );
        let mut b = with_sections(plugin(), 1, 0, 1);
        put16(&mut b, 58, 40);
        not_loadable(&b, "section headers of 40 bytes");
        // `with_sections` adds two headers of 64 bytes.
        let with_table = len + 2 * SHDR_SIZE;
        truncated(
            &with_sections(plugin(), 1, with_table, 1),
            "section 1 ends at byte",
        );
        truncated(
            &with_sections(plugin(), 1, 64, with_table),
            "section 1 ends at byte",
        );
        truncated(
            &with_sections(plugin(), 1, u64::MAX, 2),
            "section 1 ends at byte",
        );
        // A section that takes no room in the file (.bss) may lie past its end.
        assert_eq!(
            check(&with_sections(plugin(), SHT_NOBITS, with_table, 4096)),
            Ok(())
        );
        // A PIE executable is ET_DYN too.
        let pie = library(&[exported(PLUGIN)], Hash::Sysv, &[(DT_FLAGS_1, DF_1_PIE)]);
        not_loadable(&pie, "position-independent executable");
    }

    #[test]
    fn a_segment_past_the_end_is_a_truncation() {
        let b = plugin();
        let len = b.len();
        // The file cut right after its headers: the PT_LOAD covering the whole file is past
        // the end.
        let cut = &b[..len - 1];
        match check(cut) {
            Err(Refusal::Truncated(what)) => assert_eq!(
                what,
                format!(
                    "segment 0 (PT_LOAD) ends at byte {len} but the file has {} bytes",
                    len - 1
                )
            ),
            other => panic!("{other:?}"),
        }
        let mut b = plugin();
        put64(&mut b, 64 + PHDR_SIZE as usize + 8, u64::MAX - 4);
        truncated(&b, "segment 1 (PT_DYNAMIC) ends at byte 18446744073709551");
        truncated(
            &b"\x7fELF\x02\x01\x01\x00\x00\x00"[..],
            "the ELF header needs 64 bytes but the file has 10 bytes",
        );
        truncated(&b"\x7fE"[..], "the file has 2 bytes");
        // No PT_LOAD at all.
        let mut b = plugin();
        put32(&mut b, 64, 4);
        not_loadable(&b, "no loadable segment");
    }

    #[test]
    fn broken_symbol_tables_are_refused_not_read_out_of_bounds() {
        // The symbol count claims more symbols than the file holds.
        let mut b = plugin();
        let dynamic = 64 + 2 * PHDR_SIZE as usize;
        let hash_at = u64::from_le_bytes(b[dynamic + 8..dynamic + 16].try_into().unwrap()) as usize;
        put32(&mut b, hash_at + 4, u32::MAX);
        not_loadable(&b, "runs past the end");
        // The symbol table's address is not in any segment.
        let mut b = plugin();
        put64(&mut b, dynamic + 2 * 16 + 8, 1 << 40);
        not_loadable(&b, "outside the loaded segments");
        // Symbols of another size.
        let mut b = plugin();
        put64(&mut b, dynamic + 4 * 16 + 8, 16);
        not_loadable(&b, "24 bytes");
        // A GNU hash table whose chain never ends.
        let mut b = library(&[exported("x"), exported(PLUGIN)], Hash::Gnu, &[]);
        let hash_at = u64::from_le_bytes(b[dynamic + 8..dynamic + 16].try_into().unwrap()) as usize;
        let last = hash_at + 28 + 4;
        let chain = u32::from_le_bytes(b[last..last + 4].try_into().unwrap());
        put32(&mut b, last, chain & !1);
        assert!(check(&b).is_err());
    }

    /// Every prefix of a plugin and thousands of corrupted copies: refused or accepted, never a
    /// panic; and no proper prefix is ever accepted.
    #[test]
    fn no_prefix_or_corruption_panics() {
        for b in [
            plugin(),
            library(&[exported("x"), exported(PLUGIN)], Hash::Gnu, &[]),
            with_sections(plugin(), 1, 64, 64),
        ] {
            for n in 0..b.len() {
                assert!(check(&b[..n]).is_err(), "a {n}-byte prefix was accepted");
            }
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            for _ in 0..5000 {
                let mut c = b.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() % c.len() as u64) as usize;
                    c[at] = match next() % 3 {
                        0 => next() as u8,
                        1 => 0xff,
                        _ => 0,
                    };
                }
                let _ = check(&c);
            }
        }
    }

    #[test]
    fn a_system_library_is_refused_as_not_a_plugin() {
        let libz = [
            "/lib/x86_64-linux-gnu/libz.so.1",
            "/usr/lib/x86_64-linux-gnu/libz.so.1",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("libz, a foreign shared library");
        let bytes = std::fs::read(libz).unwrap();
        assert_eq!(check(&bytes), Err(Refusal::NotAPlugin));
        for n in [0, 10, 100, 1000, bytes.len() / 2, bytes.len() - 1] {
            assert!(check(&bytes[..n]).is_err(), "{n}");
        }
    }
}
