// swift-tools-version:5.9
// The app's non-UI logic: manifest checks, Gemma chat format, chunk plans, sampling, the generation
// loop and multi-turn cache reuse. Foundation only; `swift test` runs its XCTest suite against the
// shared vectors in mobile_demo/shared/test_vectors.
import PackageDescription

let package = Package(
    name: "GemmaChatCore",
    platforms: [.iOS(.v16), .macOS(.v13)],
    products: [
        .library(name: "GemmaChatCore", targets: ["GemmaChatCore"]),
    ],
    targets: [
        .target(name: "GemmaChatCore"),
        .testTarget(name: "GemmaChatCoreTests", dependencies: ["GemmaChatCore"]),
    ]
)
